#include "loratune/amp.h"

#include <ATen/core/grad_mode.h>
#include <ATen/ATen.h>

#include "common/torch_compat.h"
#include "common/value_rules.h"
#include "loratune/errors.h"
#include "loratune/device.h"

namespace loratune {

Precision resolve_precision(const std::string& name, const c10::Device& device) {
  if (name == "fp32") return Precision::kFp32;
  if (name == "bf16") {
    if (device.is_cuda() && !cuda_bf16_supported())
      throw InputError("this GPU does not support bf16; use precision fp16 (with loss scaling) or fp32");
    return Precision::kBf16;
  }
  if (name == "fp16") {
    if (!device.is_cuda()) throw InputError("precision fp16 needs a CUDA device; on the CPU use bf16 or fp32");
    return Precision::kFp16;
  }
  if (name == "auto") {
    if (!device.is_cuda()) return Precision::kFp32;
    return cuda_bf16_supported() ? Precision::kBf16 : Precision::kFp16;
  }
  throw InputError("precision must be " + choices_text(precision_choices()) + " (got \"" + name + "\")");
}

const std::vector<std::string>& precision_choices() {
  static const std::vector<std::string> names = {"auto", "fp32", "bf16", "fp16"};
  return names;
}

std::string precision_name(Precision p) {
  switch (p) {
    case Precision::kFp32: return "fp32";
    case Precision::kBf16: return "bf16";
    case Precision::kFp16: return "fp16";
  }
  return "?";
}

at::ScalarType compute_dtype(Precision p) {
  return p == Precision::kBf16 ? at::kBFloat16 : p == Precision::kFp16 ? at::kHalf : at::kFloat;
}

AutocastScope::AutocastScope(const c10::Device& device, Precision precision) : type_(device.type()) {
  if (precision == Precision::kFp32) return;
  active_ = true;
  was_enabled_ = compat::autocast_enabled(type_);
  was_dtype_ = compat::autocast_dtype(type_);
  compat::set_autocast_dtype(type_, compute_dtype(precision));
  compat::set_autocast_enabled(type_, true);
}

AutocastScope::~AutocastScope() {
  if (!active_) return;
  compat::set_autocast_enabled(type_, was_enabled_);
  compat::set_autocast_dtype(type_, was_dtype_);
  if (!was_enabled_) compat::clear_autocast_cache();
}

LossScaler::LossScaler(bool enabled, Options options) : enabled_(enabled), options_(options), scale_(options.init_scale) {}

at::Tensor LossScaler::scale_loss(const at::Tensor& loss) const { return enabled_ ? loss * scale_ : loss; }

bool LossScaler::unscale(const std::vector<at::Tensor>& grads) const {
  if (!enabled_ || grads.empty()) {
    for (const auto& g : grads)
      if (!at::isfinite(g).all().item<bool>()) return false;
    return true;
  }
  at::NoGradGuard no_grad;
  const at::Tensor& first = grads.front();
  if (first.is_cuda()) {
    at::Tensor found_inf = at::zeros({1}, first.options().dtype(at::kFloat));
    const at::Tensor inv_scale = at::full({1}, 1.0 / scale_, first.options().dtype(at::kFloat));
    at::_amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale);
    return found_inf.item<float>() == 0.0f;
  }
  bool finite = true;
  for (const auto& g : grads) {
    at::Tensor grad = g;
    grad.mul_(1.0 / scale_);
    finite = finite && at::isfinite(grad).all().item<bool>();
  }
  return finite;
}

void LossScaler::update(bool found_inf) {
  if (!enabled_) return;
  if (found_inf) {
    scale_ *= options_.backoff_factor;
    growth_tracker_ = 0;
    return;
  }
  if (++growth_tracker_ >= options_.growth_interval) {
    scale_ *= options_.growth_factor;
    growth_tracker_ = 0;
  }
}

}  // namespace loratune
