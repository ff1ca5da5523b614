// Mixed precision: autocast scopes, precision choice, and the dynamic loss scaler for fp16.
#pragma once

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include <string>
#include <vector>

#include <ATen/Tensor.h>

namespace loratune {

enum class Precision { kFp32, kBf16, kFp16 };

// "auto": CUDA -> bf16 where the GPU supports it, else fp16; CPU -> fp32. "fp16" needs CUDA.
const std::vector<std::string>& precision_choices();  // auto, fp32, bf16, fp16
Precision resolve_precision(const std::string& name, const c10::Device& device);
std::string precision_name(Precision p);
at::ScalarType compute_dtype(Precision p);  // kFloat, kBFloat16 or kHalf

// Autocast on `device` for the scope's lifetime (nothing for fp32). Restores the previous state and clears the
// cast cache on exit, as Python's torch.autocast does.
class AutocastScope {
 public:
  AutocastScope(const c10::Device& device, Precision precision);
  ~AutocastScope();
  AutocastScope(const AutocastScope&) = delete;
  AutocastScope& operator=(const AutocastScope&) = delete;

 private:
  c10::DeviceType type_;
  bool active_ = false, was_enabled_ = false;
  at::ScalarType was_dtype_ = at::kFloat;
};

// Dynamic loss scaling (fp16): multiply the loss by `scale`; before the optimiser step, unscale the gradients and
// skip the step if any is inf/NaN, halving the scale; double it after `growth_interval` clean steps in a row.
class LossScaler {
 public:
  struct Options {
    double init_scale = 65536.0;
    double growth_factor = 2.0;
    double backoff_factor = 0.5;
    int64_t growth_interval = 2000;
  };
  LossScaler(bool enabled, Options options);

  bool enabled() const { return enabled_; }
  at::Tensor scale_loss(const at::Tensor& loss) const;
  // Divides the gradients by the scale in place; returns true when all of them are finite. Uses the fused AMP
  // kernel on CUDA and plain tensor operations elsewhere (the same result).
  bool unscale(const std::vector<at::Tensor>& grads) const;
  // After a step: `found_inf` = the step was skipped.
  void update(bool found_inf);

  double scale() const { return scale_; }
  int64_t growth_tracker() const { return growth_tracker_; }
  void restore(double scale, int64_t growth_tracker) { scale_ = scale, growth_tracker_ = growth_tracker; }

 private:
  bool enabled_;
  Options options_;
  double scale_;
  int64_t growth_tracker_ = 0;
};

}  // namespace loratune
