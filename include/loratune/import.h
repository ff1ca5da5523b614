// Checkpoint folders as model bundles, without Python: Hugging Face transformers (vit, deit, dinov2, clip, siglip,
// the text towers of CLIP and SigLIP too), timm VisionTransformer and open_clip ViT CLIPs, as the hub ships them
// (config + safetensors). The bundle is built in memory (TorchScript modules with the original module names,
// stem/blocks/head), so everything that takes a model file takes such a folder too (load_bundle), and
// `loratune import` saves it.
#pragma once

#include <torch/script.h>

#include <nlohmann/json.hpp>

#include <filesystem>
#include <map>
#include <string>

namespace loratune {

enum class Tower { image, text };

// Largest input side a bundle may declare (resize_size included): 4x the largest encoders' 1024 px; beyond it
// metadata is damage or hostility, and would size huge allocations. Imports check configs against it.
inline constexpr int64_t kMaxBundleImageSize = 4096;

// A source names a checkpoint folder: a directory with config.json or open_clip_config.json, or
// "hf:ORG/NAME[@REVISION]" in the local Hugging Face cache. A trailing "#text" asks for the text tower of a CLIP.
bool is_checkpoint_source(const std::string& source);

// The folder of a source: "hf:" ids are looked up in the hub cache ($HF_HUB_CACHE, $HF_HOME/hub,
// ~/.cache/huggingface/hub) and never downloaded. InputError with the `hf download` command when absent.
std::filesystem::path resolve_checkpoint_folder(const std::string& source);

struct ImportOptions {
  int64_t image_size = 0;  // 0: the checkpoint's own; else position tables are resampled to this size
};

struct ImportedModel {
  torch::jit::Module module;        // stem / blocks / head with forward, as docs/bundle-format.md describes
  nlohmann::json metadata;          // the bundle metadata (docs/bundle-format.md)
  std::map<std::string, std::string> extra_files;  // files a text tower carries (BPE merges)
};

// Builds the bundle of `source` (its image tower, or with "#text" or tower=text its text tower). InputError naming
// the file and the key for anything that does not fit: unknown family (with the supported list), missing or extra
// tensors, shapes against the config, pickled weights.
ImportedModel import_checkpoint(const std::string& source, Tower tower = Tower::image, const ImportOptions& options = {});

// The source naming the text tower of `source`'s folder (appends "#text" unless there).
std::string text_tower_source(const std::string& source);

// Whether the source has a text tower that import_checkpoint(source, Tower::text) builds.
bool has_text_tower(const std::string& source);

// "transformers: vit, deit, ...; timm: ...; open_clip: ..." for help texts and errors.
std::string supported_checkpoint_families();

}  // namespace loratune
