// Gradient checkpointing for TorchScript blocks (C++ has no torch.utils.checkpoint), used by Model.
#pragma once

#include <torch/script.h>

#include <vector>

namespace loratune {

// What a checkpointed block does with the input it keeps for backward and around its recompute (offloading, see
// block_offload.h). `block`: the block's index in the model.
struct RecomputeHooks : torch::CustomClassHolder {
  virtual at::Tensor stash_input(int64_t block, const at::Tensor& input) = 0;       // what is kept for backward
  virtual at::Tensor restore_input(int64_t block, const at::Tensor& stashed) = 0;  // the input again, in backward
  virtual void before_recompute(int64_t block) = 0;
  virtual void after_recompute(int64_t block) = 0;
};

// Runs `block` on `input` without keeping its activations; recomputes them in backward with the same random
// state and autocast state. `parameters`: the trainable tensors the block uses (their gradients are returned).
// `forward_with_grad`: run the first pass in grad mode too (dropping its graph), for blocks whose kernels depend on
// grad mode (see has_grad_mode_dependent_kernels), so that both passes compute the same thing. `hooks` (optional)
// are called with `index`.
at::Tensor checkpointed_block(const torch::jit::Module& block, const at::Tensor& input,
                              const std::vector<at::Tensor>& parameters, bool forward_with_grad,
                              c10::intrusive_ptr<RecomputeHooks> hooks = {}, int64_t index = 0);

// True when some code of `module` picks other kernels without grad mode: nn.MultiheadAttention's inference fast
// path (aten::_native_multi_head_attention) in scripted models.
bool has_grad_mode_dependent_kernels(const torch::jit::Module& module);

// Output of a block: a tensor, or the first element of a tuple (HF layers return tuples).
at::Tensor run_block(const torch::jit::Module& block, const at::Tensor& input);

}  // namespace loratune
