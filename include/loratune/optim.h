// AdamW with PyTorch's update rule and a state that checkpoints exactly; learning-rate schedule; clipping.
#pragma once

#include <map>
#include <string>
#include <vector>

#include "loratune/named_tensor.h"
#include "loratune/safetensors.h"

namespace loratune {

struct AdamWOptions {
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  double weight_decay = 0.01;  // decoupled; applied to matrices (dim >= 2) only, not to biases
};

class AdamW {
 public:
  AdamW(std::vector<NamedTensor> params, AdamWOptions options);

  // One update with learning rate `lr` (times the tensor's multiplier) from the tensors' current .grad().
  void step(double lr);
  void zero_grad();
  int64_t steps() const { return steps_; }

  // Per-tensor learning-rate multiplier (e.g. a different rate for the head).
  void set_lr_multiplier(const std::string& name, double multiplier);

  // Moments and step count, for checkpoints.
  safetensors::Tensors state() const;
  void load_state(const safetensors::Tensors& state);

 private:
  struct Slot {
    NamedTensor param;
    at::Tensor exp_avg, exp_avg_sq;
    double lr_multiplier = 1.0;
  };
  std::vector<Slot> slots_;
  AdamWOptions options_;
  int64_t steps_ = 0;
};

// Linear warm-up to `base_lr` over `warmup_steps`, then cosine decay to `min_ratio * base_lr` at `total_steps`.
double scheduled_lr(int64_t step, int64_t total_steps, int64_t warmup_steps, double base_lr, double min_ratio);

// Scales gradients so that their global L2 norm is at most `max_norm` (as torch.nn.utils.clip_grad_norm_).
// Returns the norm before clipping. `max_norm` <= 0 only measures.
double clip_grad_norm(const std::vector<NamedTensor>& params, double max_norm);

}  // namespace loratune
