#include "import/timm_architectures.h"

#include <algorithm>
#include <cstring>
#include <iterator>

namespace loratune::importer {
namespace {

struct TimmVisionTransformer {
  const char* name;
  bool distilled;
  const char* model_args;
};

struct TimmOtherArchitecture {
  const char* name;
  const char* module;
};

#include "import/timm_architectures.inc"

// The modules whose models people most often mistake for plain ViTs, in words; any other module by its name.
std::string describe_module(const std::string& module) {
  static const std::pair<const char*, const char*> kDescriptions[] = {
      {"eva", "an Eva (rotary position embeddings, SwiGLU MLP)"},
      {"beit", "a BEiT (relative position bias in every block)"},
      {"vision_transformer_relpos", "a ViT with relative position embeddings"},
      {"vision_transformer_hybrid", "a hybrid ViT (a ResNet stem before the blocks)"},
      {"vision_transformer_sam", "a SAM image encoder (windowed attention, relative positions)"},
      {"naflexvit", "a NaFlexViT (variable-resolution patch sequences)"},
      {"cait", "a CaiT (class-attention layers)"},
      {"fastvit", "a FastViT (MobileCLIP's convolutional image tower: use scripts/export/open_clip_mobileclip.py "
                  "or apple_mobileclip.py)"},
      {"swin_transformer", "a Swin Transformer (shifted windows)"},
      {"convnext", "a ConvNeXt (a convolutional network)"},
      {"resnet", "a ResNet (a convolutional network)"},
  };
  for (const auto& [m, words] : kDescriptions)
    if (module == m) return words;
  return std::string("a timm ") + module + " model";
}

template <typename Record, size_t N>
const Record* find(const Record (&table)[N], const std::string& name) {
  const Record* end = table + N;
  const Record* it = std::lower_bound(table, end, name, [](const Record& r, const std::string& n) { return n.compare(r.name) > 0; });
  return it != end && name == it->name ? it : nullptr;
}

}  // namespace

std::optional<TimmVisionTransformerArgs> timm_vision_transformer(const std::string& name) {
  const TimmVisionTransformer* r = find(kTimmVisionTransformers, name);
  if (!r) return std::nullopt;
  return TimmVisionTransformerArgs{r->distilled, nlohmann::json::parse(r->model_args)};
}

std::optional<std::string> timm_other_architecture(const std::string& name) {
  const TimmOtherArchitecture* r = find(kTimmOtherArchitectures, name);
  if (!r) return std::nullopt;
  return describe_module(r->module);
}

const char* timm_table_version() { return kTimmTableVersion; }

}  // namespace loratune::importer
