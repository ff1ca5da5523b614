// Quantised frozen Linear weights inside a loaded TorchScript model: the graph rewrite behind Model::to's
// frozen_quant.
#pragma once

#include <torch/script.h>

#include <string>
#include <vector>

#include "loratune/quantize.h"

namespace loratune {

// Quantises the 2-D `weight` of every module under `scopes` (module paths: the model's blocks) whose weight only feeds
// aten::linear in the module's own code: each is quantised on `device`, the dense weight becomes an empty tensor and
// the module's linear calls loratune::frozen_linear. Adapters must be prepared before (they read the graph).
FrozenQuantization quantize_frozen_linears(torch::jit::Module root, const std::vector<std::string>& scopes,
                                           QuantFormat format, const c10::Device& device);

// Whether a buffer name is one of the quantised weight's (they keep their dtypes when the rest goes 16-bit).
bool is_quantized_weight_buffer(const std::string& name);

}  // namespace loratune
