// The backbone's transformer blocks as the model runs them: which tensors train in each block, the frozen prefix in
// front of the first block that trains, recomputation in backward (checkpointing) and the memory tiers: frozen
// weights and checkpointed inputs kept in host memory, brought to the device one block ahead of use.
#pragma once

#include <torch/script.h>

#include <string>
#include <vector>

#include "loratune/bundle.h"
#include "loratune/lora.h"
#include "loratune/method.h"

namespace loratune {

class BlockOffload;

// What stays in host memory during training (meant for CUDA; see BlockStack::set_offload).
struct OffloadSettings {
  bool weights = false;      // the blocks' frozen tensors, copied to the device one block ahead of use
  bool activations = false;  // the inputs checkpointed blocks keep for backward, copied back one block ahead
  bool any() const { return weights || activations; }
};

class BlockStack {
 public:
  // The blocks of `bundle` (none without block structure).
  explicit BlockStack(const Bundle& bundle);
  ~BlockStack();
  BlockStack(const BlockStack&) = delete;
  BlockStack& operator=(const BlockStack&) = delete;

  bool empty() const { return blocks_.empty(); }
  int64_t size() const { return static_cast<int64_t>(blocks_.size()); }
  const std::vector<std::string>& paths() const { return paths_; }

  // The tensors that train in each block: all its parameters under method full, the trainable tensors of the
  // `adapters` inside it under method lora, `block_tensors[i]` (AdaptFormer's) in block i. The frozen prefix
  // follows: none under method full, nor when prompt tokens join before the first block (`prompted`), since every
  // block then runs on them.
  void assign_trainable(Method method, const std::vector<LoraTarget>& adapters, bool prompted,
                        const std::vector<std::vector<at::Tensor>>& block_tensors = {});
  // Leading blocks with nothing to train, and the blocks after them.
  int64_t frozen_prefix() const { return prefix_; }
  int64_t trained_count() const { return size() - prefix_; }

  // Runs blocks [first, last) on `h`: each block that has trainable tensors is recomputed in backward where
  // `checkpoint` and gradients are on; offloaded blocks come to the device one block ahead.
  at::Tensor run(at::Tensor h, int64_t first, int64_t last, bool checkpoint);

  // Offloading to host memory (method lora), started by start_offload (Model::to): the blocks' frozen tensors stay
  // in host memory (pinned on CUDA) in their storage dtype, quantised or not, and only the running block's and the
  // next one's are on the device (in backward too); with checkpointing, the blocks' saved inputs go to host memory
  // and come back one block ahead in backward. On CUDA the copies run on a side stream; on the CPU the same
  // schedule runs with plain copies (nothing is saved there: training leaves it off on the CPU).
  void set_offload(OffloadSettings settings);
  const OffloadSettings& offload() const { return offload_settings_; }
  bool offloading() const { return offload_ != nullptr; }
  void start_offload(const c10::Device& device);
  // Bytes and parameters of frozen weights waiting in host memory (weight offload).
  int64_t offloaded_weight_bytes() const;
  int64_t offloaded_parameter_count() const;
  // The most blocks whose weights were on the device at once since the last call (0 without weight offload).
  int64_t take_peak_resident_blocks();

 private:
  std::vector<torch::jit::Module> blocks_;
  std::vector<std::string> paths_;
  std::vector<bool> grad_dependent_;             // see has_grad_mode_dependent_kernels
  std::vector<std::vector<at::Tensor>> trains_;  // trainable tensors inside each block
  int64_t prefix_ = 0;
  OffloadSettings offload_settings_;
  c10::intrusive_ptr<BlockOffload> offload_;
};

}  // namespace loratune
