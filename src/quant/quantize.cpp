// int8 and NF4 weight formats, and the operator `loratune::frozen_linear` that rewritten models call.
#include "loratune/quantize.h"

#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <map>
#include <mutex>

#include "common/strings.h"
#include "common/torch_compat.h"
#include "loratune/errors.h"

namespace loratune {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The two code values of every packed byte, [256, 2] in `options`' dtype and device (cached).
at::Tensor nf4_byte_table(const at::TensorOptions& options) {
  static std::mutex mutex;
  static std::map<std::pair<std::string, at::ScalarType>, at::Tensor> tables;
  std::lock_guard<std::mutex> lock(mutex);
  at::Tensor& table = tables[{options.device().str(), c10::typeMetaToScalarType(options.dtype())}];
  if (!table.defined()) {
    std::vector<float> pairs;
    for (int byte = 0; byte < 256; ++byte) {
      pairs.push_back(nf4_code_book()[byte >> 4]);
      pairs.push_back(nf4_code_book()[byte & 15]);
    }
    table = at::tensor(pairs).view({256, 2}).to(options);
  }
  return table;
}

// Dense [out, in] weight of `q` in `dtype`. int8: values times row scales in fp32, then rounded. NF4: code values
// times the block absmax in `dtype` (fp32 for fp32: exact to its rounding), through one int32 index per byte.
at::Tensor dequantize_dense(const QuantizedWeight& q, at::ScalarType dtype) {
  const int64_t out = q.shape.at(0), in = q.shape.at(1);
  if (q.format == QuantFormat::kInt8) return (q.data.to(at::kFloat) * q.scale.unsqueeze(1)).to(dtype);
  const int64_t blocks = q.scale.numel();
  const at::Tensor group_scale = q.scale2.slice(0, 1).repeat_interleave(kNf4ScaleGroup).slice(0, 0, blocks);
  const at::Tensor absmax = (q.scale.to(at::kFloat) * group_scale + q.scale2[0]).to(dtype);
  const at::Tensor table = nf4_byte_table(q.scale2.options().dtype(dtype));
  const at::Tensor values = table.index_select(0, q.data.to(at::kInt)).view({blocks, kNf4BlockSize});
  return (values * absmax.unsqueeze(1)).view(-1).slice(0, 0, out * in).view({out, in});
}

at::Tensor nf4_indices(const at::Tensor& normalised) {
  // Nearest code value: the midpoints between neighbours split the line.
  std::vector<float> mid;
  const auto& code = nf4_code_book();
  for (size_t k = 0; k + 1 < code.size(); ++k) mid.push_back(0.5f * (code[k] + code[k + 1]));
  const at::Tensor boundaries = at::tensor(mid, normalised.options());
  return at::searchsorted(boundaries, normalised.contiguous());
}

QuantizedWeight quantize_nf4(const at::Tensor& w) {
  QuantizedWeight q;
  const int64_t n = w.numel();
  const int64_t blocks = (n + kNf4BlockSize - 1) / kNf4BlockSize;
  const at::Tensor flat = at::constant_pad_nd(w.reshape(-1), {0, blocks * kNf4BlockSize - n}, 0).view({blocks, kNf4BlockSize});
  const at::Tensor absmax = flat.abs().amax(1);
  // Second level: the block absmax values, centred on their mean, as int8 with one fp32 scale per 256 blocks.
  const int64_t groups = (blocks + kNf4ScaleGroup - 1) / kNf4ScaleGroup;
  const at::Tensor mean = absmax.mean();
  const at::Tensor centred = at::constant_pad_nd(absmax - mean, {0, groups * kNf4ScaleGroup - blocks}, 0)
                                 .view({groups, kNf4ScaleGroup});
  at::Tensor group_scale = centred.abs().amax(1) / 127.0;
  group_scale = at::where(group_scale > 0, group_scale, at::ones_like(group_scale));
  const at::Tensor codes = at::round(centred / group_scale.unsqueeze(1)).clamp(-127, 127).reshape(-1).slice(0, 0, blocks);
  q.scale = codes.to(at::kChar);
  q.scale2 = at::cat({mean.reshape({1}), group_scale});
  // Indices against the absmax the dequantiser will see.
  const at::Tensor stored_absmax =
      q.scale.to(at::kFloat) * group_scale.repeat_interleave(kNf4ScaleGroup).slice(0, 0, blocks) + mean;
  const at::Tensor safe = at::where(stored_absmax != 0, stored_absmax, at::ones_like(stored_absmax));
  const at::Tensor indices = nf4_indices(flat / safe.unsqueeze(1)).reshape({-1, 2});
  q.data = (indices.select(1, 0).__lshift__(4) + indices.select(1, 1)).to(at::kByte);
  return q;
}

// Backward through the dense weight, dequantised again: the dense weight lives only while a call runs.
struct QuantizedLinearFunction : public torch::autograd::Function<QuantizedLinearFunction> {
  static variable_list forward(AutogradContext* ctx, at::Tensor x, at::Tensor bias, at::Tensor data, at::Tensor scale,
                               at::Tensor scale2, int64_t format, std::vector<int64_t> shape) {
    ctx->save_for_backward({data, scale, scale2});
    ctx->saved_data["format"] = format;
    ctx->saved_data["shape"] = shape;
    ctx->saved_data["x_dtype"] = static_cast<int64_t>(x.scalar_type());
    QuantizedWeight q{static_cast<QuantFormat>(format), shape, data, scale, scale2};
    const at::Tensor w = dequantize_weight(q, x.scalar_type());
    // Into a tensor of its own, not a view: adapters add to the output in place.
    std::vector<int64_t> sizes = x.sizes().vec();
    sizes.back() = w.size(0);
    at::Tensor y = at::empty(sizes, x.options());
    at::Tensor rows = y.view({-1, w.size(0)});
    const at::Tensor x2d = x.reshape({-1, w.size(1)});
    if (bias.defined()) at::addmm_out(rows, bias, x2d, w.t());
    else at::mm_out(rows, x2d, w.t());
    return {y};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& grad = grad_outputs[0];
    QuantizedWeight q{static_cast<QuantFormat>(ctx->saved_data["format"].toInt()),
                      ctx->saved_data["shape"].toIntVector(), saved[0], saved[1], saved[2]};
    const auto x_dtype = static_cast<at::ScalarType>(ctx->saved_data["x_dtype"].toInt());
    at::Tensor grad_x, grad_bias;
    if (ctx->needs_input_grad(0)) grad_x = grad.matmul(dequantize_weight(q, grad.scalar_type())).to(x_dtype);
    if (ctx->needs_input_grad(1)) grad_bias = grad.reshape({-1, grad.size(-1)}).sum(0);
    return {grad_x, grad_bias, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// The operator in rewritten graphs: format 0 is the module's own linear (its weight unquantised).
at::Tensor frozen_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                         int64_t format, at::IntArrayRef shape, const at::Tensor& data, const at::Tensor& scale,
                         const at::Tensor& scale2) {
  if (format == 0) return at::linear(x, weight, bias);
  QuantizedWeight q{static_cast<QuantFormat>(format), shape.vec(), data, scale, scale2};
  return quantized_linear(x, q, bias);
}

TORCH_LIBRARY(loratune, m) {
  m.def("frozen_linear(Tensor input, Tensor weight, Tensor? bias, int format, int[] shape, Tensor data, "
        "Tensor scale, Tensor scale2) -> Tensor",
        &frozen_linear);
}

}  // namespace

std::string quant_format_name(QuantFormat format) {
  switch (format) {
    case QuantFormat::kNone: return "none";
    case QuantFormat::kInt8: return "int8";
    case QuantFormat::kNf4: return "nf4";
  }
  return "?";
}

QuantFormat parse_quant_format(const std::string& name, const std::string& what) {
  for (const QuantFormat f : {QuantFormat::kNone, QuantFormat::kInt8, QuantFormat::kNf4})
    if (quant_format_name(f) == name) return f;
  throw InputError(what + " " + name + ": not a quantisation format (none, int8, nf4)");
}

const std::array<float, 16>& nf4_code_book() {
  // The quantiles of N(0, 1) normalised to [-1, 1] with an exact zero, as published with QLoRA.
  static const std::array<float, 16> code = {
      -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f,
      -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f,
      0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};
  return code;
}

std::string quantization_note(const FrozenQuantization& q) {
  std::string line = "frozen Linear weights in the blocks quantised to " + quant_format_name(q.format) + ": " +
                     std::to_string(q.modules) + " layers, " + human_count(static_cast<double>(q.parameters)) +
                     " parameters, " + human_bytes(static_cast<double>(q.dense_bytes)) + " -> " +
                     human_bytes(static_cast<double>(q.stored_bytes)) + "; the stem, norms, biases, head and any "
                     "text tower keep their dtype";
  if (!q.kept.empty()) {
    std::vector<std::string> examples(q.kept.begin(), q.kept.begin() + std::min<size_t>(3, q.kept.size()));
    line += "; " + std::to_string(q.kept.size()) + " Linear-shaped weights kept, e.g. " + join(examples, ", ");
  }
  return line;
}

int64_t QuantizedWeight::bytes() const {
  int64_t n = 0;
  for (const auto* t : {&data, &scale, &scale2})
    if (t->defined()) n += static_cast<int64_t>(t->nbytes());
  return n;
}

QuantizedWeight quantize_weight(const at::Tensor& weight, QuantFormat format) {
  if (weight.dim() != 2) throw InputError("only 2-D (Linear) weights are quantised");
  at::NoGradGuard no_grad;
  const at::Tensor w = weight.detach().to(at::kFloat);
  QuantizedWeight q;
  if (format == QuantFormat::kInt8) {
    at::Tensor scale = w.abs().amax(1) / 127.0;
    const at::Tensor safe = at::where(scale > 0, scale, at::ones_like(scale));
    q.data = at::round(w / safe.unsqueeze(1)).clamp(-127, 127).to(at::kChar);
    q.scale = scale;
    q.scale2 = at::empty({0}, w.options());
  } else if (format == QuantFormat::kNf4) {
    q = quantize_nf4(w);
  } else {
    throw InputError("internal: quantize_weight needs int8 or nf4");
  }
  q.format = format;
  q.shape = w.sizes().vec();
  return q;
}

at::Tensor dequantize_weight(const QuantizedWeight& q, at::ScalarType dtype) {
  at::NoGradGuard no_grad;
  return dequantize_dense(q, dtype);
}

at::Tensor quantized_linear(const at::Tensor& x, const QuantizedWeight& q, const c10::optional<at::Tensor>& bias) {
  const auto device = x.device().type();
  const at::ScalarType dtype = compat::autocast_enabled(device) ? compat::autocast_dtype(device) : x.scalar_type();
  at::Tensor b = bias.has_value() && bias->defined() ? bias->to(dtype) : at::Tensor();
  return QuantizedLinearFunction::apply(x.to(dtype), b, q.data, q.scale, q.scale2, static_cast<int64_t>(q.format),
                                        q.shape)[0];
}

}  // namespace loratune
