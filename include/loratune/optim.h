// AdamW with PyTorch's update rule and a state that checkpoints exactly; learning-rate schedule; clipping.
// Tensors that train with the same learning rate and decay share flat buffers: their parameters and gradients
// become views of one tensor each, beside flat moments, so that a step, the unscale and the clipping are a few
// operations per group whatever the number of tensors (LoRA has two or three per adapted weight).
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

  // One update with learning rate `lr` (times the tensor's multiplier) from the tensors' current .grad(). Every
  // tensor is updated; one that had no gradient counts as a zero gradient.
  void step(double lr);
  void zero_grad();
  int64_t steps() const { return steps_; }

  // Per-tensor learning-rate multiplier (e.g. a different rate for the head).
  void set_lr_multiplier(const std::string& name, double multiplier);

  // The flat gradient buffers, one per group (each tensor's .grad() is a view into one): for unscaling, clipping
  // and summing over data-parallel workers.
  std::vector<at::Tensor> gradients();

  // Moments and step count, for checkpoints. load_state checks every tensor (dtype, shape, finite, moments >= 0)
  // before it changes anything: InputError naming `origin` (the checkpoint file).
  safetensors::Tensors state() const;
  void load_state(const safetensors::Tensors& state, const std::string& origin);

 private:
  struct Slot {
    NamedTensor param;
    double lr_multiplier = 1.0;
    size_t group = 0;
    int64_t offset = 0;  // in the group's buffers
  };
  struct Group {
    double lr_multiplier = 1.0;
    bool decay = false;
    at::Tensor param, grad, exp_avg, exp_avg_sq;  // flat
  };
  // The slot's part of one of its group's flat buffers, shaped as its tensor.
  at::Tensor view(const Slot& slot, const at::Tensor& flat) const;
  // (Re)builds the groups, keeping the moments: parameters and gradients become views of the groups' buffers.
  void regroup();
  // Points a .grad() that autograd or a caller replaced back at its view (copying its values).
  void bind_gradients();

  std::vector<Slot> slots_;
  std::vector<Group> groups_;
  bool regroup_ = true;
  AdamWOptions options_;
  int64_t steps_ = 0;
};

// Linear warm-up to `base_lr` over `warmup_steps`, then cosine decay to `min_ratio * base_lr` at `total_steps`.
double scheduled_lr(int64_t step, int64_t total_steps, int64_t warmup_steps, double base_lr, double min_ratio);

// Scales gradients so that their global L2 norm is at most `max_norm` (as torch.nn.utils.clip_grad_norm_).
// Returns the norm before clipping. `max_norm` <= 0 only measures.
double clip_grad_norm(const std::vector<at::Tensor>& grads, double max_norm);

}  // namespace loratune
