// Weight-only quantisation of frozen Linear weights: int8 with one scale per output row, and 4-bit NormalFloat
// (NF4, QLoRA) in blocks of 64 with 8-bit block scales.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <string>
#include <vector>

namespace loratune {

enum class QuantFormat { kNone = 0, kInt8 = 1, kNf4 = 2 };

std::string quant_format_name(QuantFormat format);  // "none", "int8", "nf4"
// The format a name gives ("none", "int8", "nf4"); InputError naming `what` for any other.
QuantFormat parse_quant_format(const std::string& name, const std::string& what);

// Elements per NF4 block, and NF4 blocks per group sharing one fp32 scale for their 8-bit block scales.
constexpr int64_t kNf4BlockSize = 64;
constexpr int64_t kNf4ScaleGroup = 256;

// The 16 NF4 values (Dettmers et al. 2023, QLoRA), ascending: index 7 is 0.
const std::array<float, 16>& nf4_code_book();

// A quantised [out, in] weight.
//   int8: data int8 [out, in]; scale fp32 [out] (row absmax / 127); scale2 empty. w = data * scale.
//   nf4:  data uint8 [ceil(out*in/64)*32], two indices per byte, the first element in the high nibble; scale int8
//         [blocks]; scale2 fp32 [1 + groups]: the mean block absmax, then one scale per 256 blocks. A block's absmax
//         is scale * scale2[1 + block/256] + scale2[0]; w = code[index] * absmax over the row-major flattened weight.
struct QuantizedWeight {
  QuantFormat format = QuantFormat::kNone;
  std::vector<int64_t> shape;  // [out, in]
  at::Tensor data, scale, scale2;
  int64_t bytes() const;
};

// What quantising a model's frozen Linear weights did (Model::to with a frozen_quant).
struct FrozenQuantization {
  QuantFormat format = QuantFormat::kNone;
  int64_t modules = 0;        // Linear weights quantised
  std::vector<std::string> quantized;  // their module paths
  int64_t parameters = 0;     // their elements
  int64_t dense_bytes = 0;    // what they took before
  int64_t stored_bytes = 0;   // what they take now (data and scales)
  std::vector<std::string> kept;  // Linear-shaped weights under `scopes` that stay as they were, with the reason
};

// One line for the user: what was quantised, bytes before and after, what stays (with examples).
std::string quantization_note(const FrozenQuantization& q);

// Quantises on the weight's device (computes in fp32).
QuantizedWeight quantize_weight(const at::Tensor& weight, QuantFormat format);
// Back to a dense [out, in] weight in `dtype`: int8 computed in fp32 and rounded; NF4 code values times block absmax
// computed in `dtype` (in fp32 that is the float64 product rounded once).
at::Tensor dequantize_weight(const QuantizedWeight& q, at::ScalarType dtype);

// linear(x, dequantize(q), bias) whose backward dequantises again instead of keeping the dense weight: the
// input gradient flows, the quantised weight is frozen. Under autocast it computes in the autocast dtype.
at::Tensor quantized_linear(const at::Tensor& x, const QuantizedWeight& q, const c10::optional<at::Tensor>& bias);

}  // namespace loratune
