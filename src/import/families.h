// What the importers of each family share: the folder with its config, weights and preprocessing, and the bundle
// they return.
#pragma once

#include <nlohmann/json.hpp>

#include <cmath>
#include <filesystem>
#include <optional>
#include <string>

#include "import/script_builder.h"
#include "loratune/import.h"

namespace loratune::importer {

struct Folder {
  std::filesystem::path dir;
  std::string display;  // the source as the user wrote it
  std::string name;     // "ORG/NAME" for hub ids, else the folder name

  std::filesystem::path file(const std::string& name) const { return dir / name; }
  bool has(const std::string& name) const;
  // A JSON file of the folder (InputError naming it when it cannot be read or parsed).
  nlohmann::json json_file(const std::string& name) const;
  std::string where(const std::string& file_name) const { return (dir / file_name).string(); }
};

// The weights of a folder: `stem`.safetensors, or the shards listed in `stem`.safetensors.index.json. Pickled
// weights (`bin_name`, .pth) are refused with a way to convert them.
CheckpointTensors read_weights(const Folder& folder, const std::string& stem, const std::string& bin_name);

// Typed config values with errors that name the file and key.
int64_t config_int(const nlohmann::json& j, const std::string& key, const std::string& where,
                   std::optional<int64_t> fallback = std::nullopt);
// The most transformer blocks an imported tower may have (the largest published encoders have under 100).
inline constexpr int64_t kMaxImportedLayers = 1024;

// A size (width, heads, patch, image size, layers, ...): an integer from 1 to `max`.
int64_t config_size(const nlohmann::json& j, const std::string& key, const std::string& where,
                    std::optional<int64_t> fallback = std::nullopt, int64_t max = int64_t{1} << 24);
// A number; with bounds, one in (low, high] (an eps in (0, 1], a ratio in (0, 64]).
double config_number(const nlohmann::json& j, const std::string& key, const std::string& where,
                     std::optional<double> fallback = std::nullopt, double low = -HUGE_VAL, double high = HUGE_VAL);
std::string config_string(const nlohmann::json& j, const std::string& key, const std::string& where,
                          std::optional<std::string> fallback = std::nullopt);

// Preprocessing fields of the bundle metadata.
struct Preprocessing {
  int64_t image_size = 224, resize_size = 224;
  std::string interpolation = "bicubic";
  std::array<float, 3> mean{0.5f, 0.5f, 0.5f}, std{0.5f, 0.5f, 0.5f};
  void write(nlohmann::json& metadata) const;
};

// Metadata every imported image bundle has; the caller adds family-specific fields.
nlohmann::json image_metadata(const std::string& architecture, const Folder& folder, int64_t feature_dim,
                              const std::string& blocks, const std::string& module_prefix, const Preprocessing& pre);

// Each family: the folder is known to be of it.
ImportedModel import_transformers(const Folder& folder, const nlohmann::json& config, Tower tower,
                                  const ImportOptions& options);
ImportedModel import_timm(const Folder& folder, const nlohmann::json& config, const ImportOptions& options);
ImportedModel import_open_clip(const Folder& folder, const nlohmann::json& config, Tower tower,
                               const ImportOptions& options);

// Families and model types each importer knows, for errors.
extern const char* const kTransformersTypes;

// A CLIP-style text tower as a TorchScript module (tokens [N, L] int64 -> projected embeddings [N, P]): token and
// position embeddings, pre-norm blocks (causal for CLIP), final norm, the features at the end-of-text token (CLIP:
// the largest token id, which its tokenizer gives EOT) or at the last position (SigLIP), the projection.
struct TextTowerNames {
  std::string token_embedding, position_embedding;  // parameter keys
  std::string blocks;          // "text_model.encoder.layers" / "transformer.resblocks"
  std::string final_norm;      // "text_model.final_layer_norm" / "ln_final"
  std::string projection;      // "text_projection.weight" ([P, W], a Linear) or "text_projection" ([W, P], a matrix)
  bool projection_is_linear = true;
  bool projection_bias = false;
  bool pool_last = false;      // SigLIP: the last position (sequences are padded to the context length)
  BlockLayout layout;
};

struct TextTowerShape {
  int64_t width = 0, heads = 0, layers = 0, mlp_hidden = 0, context = 77, vocab = 49408, embed_dim = 0;
  double eps = 1e-5;
};

torch::jit::Module clip_text_tower(ScriptBuilder& builder, CheckpointTensors& ckpt, const TextTowerNames& names,
                                   const TextTowerShape& shape);

// The text bundle: the tower, the logit scale (exp of the checkpoint's "logit_scale", else 100), the metadata
// (`tokenizer` fields added to it) and the folder's tokenizer file `tokenizer_file` inside, as `bundle_file`. Every
// tensor of `ckpt` must be used.
ImportedModel clip_text_bundle(const Folder& folder, CheckpointTensors& ckpt, const TextTowerNames& names,
                               const TextTowerShape& shape, const std::string& architecture,
                               const std::string& tokenizer_file, const nlohmann::json& tokenizer);

}  // namespace loratune::importer
