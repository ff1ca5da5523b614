// A model bundle: a TorchScript file whose forward maps a normalised image batch [N,3,H,W] to pooled features
// [N,D], with its metadata (preprocessing, family, feature dim, block layout). See docs/bundle-format.md.
#pragma once

#include <torch/script.h>

#include <nlohmann/json.hpp>

#include <array>
#include <filesystem>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "loratune/import.h"  // kMaxBundleImageSize

namespace loratune {

// Name of the metadata file inside the TorchScript archive (extra files), or `<model>.json` beside it.
inline constexpr const char* kBundleMetadataName = "loratune.json";
inline constexpr int kBundleFormatVersion = 1;

struct BundleInfo {
  std::string kind = "backbone";  // "backbone": images -> features; "classifier": images -> logits (merged)
  std::string family;             // "vit", "mobileclip"
  std::string architecture;       // "hf_vit", "timm_vit", "torchvision_vit", "mobileclip_mci", ...
  std::string name;               // free text: where the weights came from
  int64_t feature_dim = 0;
  int64_t image_size = 224;       // square crop fed to the model
  int64_t resize_size = 256;      // short side before the center crop
  std::string interpolation = "bilinear";  // "bilinear", "bicubic", "nearest", "area"
  std::array<float, 3> mean{0.485f, 0.456f, 0.406f};
  std::array<float, 3> std{0.229f, 0.224f, 0.225f};
  std::string blocks;             // path of the transformer block list (empty: no per-block structure)
  std::string module_prefix;      // prefix of module paths that the original Python model does not have
  std::vector<std::string> classes;  // classifier only
  nlohmann::json extra = nlohmann::json::object();  // anything else (kept verbatim when re-saved)

  nlohmann::json to_json() const;
  static BundleInfo from_json(const nlohmann::json& j, const std::string& origin);
};

struct Bundle {
  torch::jit::Module module;
  BundleInfo info;
  std::filesystem::path path;  // the file, or the checkpoint source it was imported from
  std::string fingerprint;  // of the weights as loaded (see fingerprint.h)
  std::map<std::string, std::string> extra_files;  // files an imported bundle carries (a text tower's BPE merges)

  // The structure the training driver uses: `stem(images)`, then each block, then `head(hidden)`.
  bool has_block_structure() const;
  torch::jit::Module blocks_module() const;
  std::vector<torch::jit::Module> blocks() const;
};

// Loads a bundle onto the CPU: a bundle file, or a checkpoint folder / "hf:ORG/NAME" imported in memory (import.h).
// Throws InputError with a fix for files that are not bundles or cannot be trained.
Bundle load_bundle(const std::filesystem::path& path);

// The text encoder an image bundle names in its metadata ("text_model", relative to the image bundle); InputError
// when it names none.
std::filesystem::path text_model_for(const Bundle& image_bundle);
// What to load for a text tower given as a text bundle or a CLIP checkpoint folder (its text tower).
std::filesystem::path text_tower_path(const std::filesystem::path& given);

// Saves `module` with `info` (and `extra_files`) inside the archive, atomically. `check(temporary_file)`, when given,
// runs on the file as written before it replaces `path`; if it throws, `path` is left as it was.
void save_bundle(torch::jit::Module& module, const BundleInfo& info, const std::filesystem::path& path,
                 const std::function<void(const std::filesystem::path&)>& check = {},
                 const std::map<std::string, std::string>& extra_files = {});

// The submodule at a dotted path ("vit.encoder.layer.3"); InputError when absent.
torch::jit::Module submodule_at(const torch::jit::Module& root, const std::string& path);

// Raises InputError if some graph of `module` runs an op that has no backward whatever the inputs
// (aten::_native_multi_head_attention traced under torch.no_grad()).
void check_trainable_graph(const torch::jit::Module& module, const std::string& origin);

}  // namespace loratune
