// Adapters and models: what a trained model holds as an adapter, and putting an adapter onto a model of its base.
#pragma once

#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "loratune/adapter.h"
#include "loratune/model.h"

namespace loratune {

// What a trained model holds, as an adapter for its base.
Adapter adapter_from_model(const Model& model, const std::vector<std::string>& classes, nlohmann::json training);

// Refuses an adapter made for another base: different fingerprint, or weights of other shapes. The message says which.
void check_adapter_base(const Adapter& adapter, const Bundle& bundle, const std::string& adapter_origin);

// The adapter's targets with bundle paths and row ranges, checked against the model's weights.
std::vector<LoraTarget> bind_targets(const Adapter& adapter, const Bundle& bundle, const std::string& adapter_origin);

// The adapter's text-tower targets bound to `text`, which must be the text tower it was trained with.
std::vector<LoraTarget> bind_text_targets(const Adapter& adapter, const Bundle& text, const std::string& adapter_origin);

// For adapter files without tower marks (PEFT's, of a whole CLIP model): moves the targets that `image` lacks and
// `text` has to adapter.text_targets.
void route_text_targets(Adapter& adapter, const Bundle& image, const Bundle& text);
// Whether some of adapter.targets are not modules of `image` (text-tower targets of a PEFT file, or another base).
bool has_targets_outside(const Adapter& adapter, const Bundle& image);

// Puts the adapter onto the model: LoRA tensors, head and (method full) base weights; the text adapters too when the
// model has its text tower (else they are already in the head they made).
void apply_adapter(Model& model, const Adapter& adapter, const std::string& adapter_origin);

// Maps a module path of the bundle to the original model's path and back.
std::string strip_prefix(const std::string& path, const std::string& prefix);
std::string add_prefix(const std::string& path, const std::string& prefix);

}  // namespace loratune
