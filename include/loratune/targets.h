// Which weights of a TorchScript model the LoRA settings adapt.
#pragma once

#include <torch/script.h>

#include <string>
#include <vector>

#include "loratune/adapter_init.h"
#include "loratune/lora.h"

namespace loratune {

// Which weights of `module` the settings adapt, with shapes and ranks (tensors not yet created).
// InputError when a pattern matches nothing; the message lists candidate modules.
// "all-linear" in lora.targets selects every 2-D weight inside `blocks_path` (the bundle's transformer blocks) that
// the model's code reads.
std::vector<LoraTarget> resolve_targets(const torch::jit::Module& module, const LoraSettings& settings,
                                        const std::string& blocks_path = "");

// Modules that could carry an adapter (those with a 2-D weight), for error messages and `loratune info`.
std::vector<std::string> candidate_modules(const torch::jit::Module& module);

// Each target's variant creates its tensors (fp32, requires_grad), A and B as `start` gives them (random ones from
// torch's global generator). `module` is the model the targets were resolved on; a start that takes a part of the
// weight (PiSSA, OLoRA) leaves its rows of the weight as W - s * B0 @ A0 and the target holds A0 and B0.
void init_adapter_tensors(std::vector<LoraTarget>& targets, const torch::jit::Module& module,
                          const AdapterInit& start = default_adapter_init());

}  // namespace loratune
