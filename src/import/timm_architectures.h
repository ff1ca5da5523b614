// What timm's own definitions say about an architecture name: the keyword arguments a VisionTransformer of that
// name is built with (generated from timm by scripts/generate/timm_architectures.py), or the timm module that
// defines it when it is another kind of model.
#pragma once

#include <nlohmann/json.hpp>

#include <optional>
#include <string>

namespace loratune::importer {

struct TimmVisionTransformerArgs {
  bool distilled = false;   // DeiT's VisionTransformerDistilled (a distillation token)
  nlohmann::json args;      // the definition's model_args (layers by name: "layernorm", "gelu_tanh", "SwiGLU", ...)
};

// `name` without its pretrained tag ("vit_base_patch16_224", not "vit_base_patch16_224.augreg_in21k").
std::optional<TimmVisionTransformerArgs> timm_vision_transformer(const std::string& name);
// For names timm defines outside vision_transformer.py / deit.py: what kind of model that is, in words
// ("an Eva (rotary position embeddings, SwiGLU MLP)"); nullopt for names timm does not define.
std::optional<std::string> timm_other_architecture(const std::string& name);
// The timm version the tables were generated from.
const char* timm_table_version();

}  // namespace loratune::importer
