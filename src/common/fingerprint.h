// Fingerprint of a model's weights: adapters remember the base they were trained on.
#pragma once

#include <torch/script.h>

#include <map>
#include <string>

namespace loratune {

// 16 hex digits over every parameter and buffer (names, dtypes, shapes, values), in name order.
std::string weights_fingerprint(const torch::jit::Module& module);

// 64-bit hash of a byte range, continuing from `seed`.
uint64_t hash_bytes(const void* data, size_t size, uint64_t seed);

// 16 hex digits over named tensors (name, dtype, shape, values), in name order, starting from `seed`.
std::string tensors_fingerprint(const std::map<std::string, at::Tensor>& tensors, uint64_t seed);

}  // namespace loratune
