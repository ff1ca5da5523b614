// Adapter files: a directory with adapter_model.safetensors and adapter_config.json, readable by PEFT where PEFT
// has an equivalent. The safetensors file alone is complete: its __metadata__ holds everything loratune needs.
// Format: docs/adapter-format.md.
#pragma once

#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "loratune/lora.h"
#include "loratune/method.h"

namespace loratune {

inline constexpr const char* kAdapterWeightsName = "adapter_model.safetensors";
inline constexpr const char* kAdapterConfigName = "adapter_config.json";
inline constexpr const char* kAdapterFormat = "loratune.adapter/1";
// Beside the adapter: the head training started from when it was not random (PEFT reads no such file).
inline constexpr const char* kInitialHeadName = "initial_head.safetensors";

struct Adapter {
  Method method = Method::kLora;
  LoraSettings lora;            // as trained
  // Module paths here are those of the original Python model (the bundle's module_prefix removed).
  std::vector<LoraTarget> targets;
  // LoRA on a CLIP text tower trained alongside (loss contrastive), by the text model's module paths: in the same
  // file, marked "tower": "text" in the metadata's target list. PEFT files carry no marks: route_text_targets().
  std::vector<LoraTarget> text_targets;
  std::string text_base_fingerprint, text_base_name;
  // The class prompts a text-derived head was made from: {"templates": [...], "names": {"class": [names]}}, or null.
  // `merge` remakes the head with them from the merged text tower.
  nlohmann::json prompts;
  at::Tensor head_weight, head_bias;  // [classes, features], [classes]
  bool normalize_features = false;    // cosine head on L2-normalised features (zero-shot initialised)
  // The zero-shot head training started from (head.init zero_shot), or undefined: `merge --strength` interpolates
  // the head from it as it interpolates the weights (WiSE-FT), so that strength 0 is the zero-shot model.
  at::Tensor initial_head_weight, initial_head_bias;
  std::vector<std::string> classes;
  std::map<std::string, at::Tensor> full_weights;  // method "full": every base parameter, by path
  // Method vpt: the settings and the prompt sets ([tokens, width]; one, or one per block when deep), stored under
  // PEFT's prompt-tuning key "prompt_embeddings" (deep: "prompt_embeddings.<block>").
  PromptSettings vpt;
  std::vector<at::Tensor> prompt_sets;
  // Method adaptformer: the settings and, per block, adaptformer_tensor_names()'s tensors, stored as
  // "adaptformer.<block>.<tensor>".
  AdaptFormerSettings adaptformer;
  std::vector<std::vector<at::Tensor>> mlp_adapters;
  std::string base_fingerprint;  // empty for adapters written by other tools
  std::string base_name;
  nlohmann::json training = nlohmann::json::object();  // settings that produced it (no timestamps: reproducible bytes)
};

// Writes `dir` atomically (a directory replaced as a whole).
void save_adapter(const std::filesystem::path& dir, const Adapter& adapter);
// Reads an adapter directory or a bare .safetensors file (loratune's, or PEFT's with adapter_config.json beside it).
Adapter load_adapter(const std::filesystem::path& path);

}  // namespace loratune
