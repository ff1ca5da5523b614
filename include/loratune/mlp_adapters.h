// AdaptFormer (Chen et al. 2022, method adaptformer): a bottleneck adapter beside each block's MLP. With x' the
// MLP's input before its LayerNorm (the block's state after attention), the block's MLP output y becomes
// y + scale * Up(ReLU(Down(x'))). The blocks' TorchScript graphs are rewritten once per block type: after the MLP's
// last call (a module under the child `mlp` in timm, torchvision and open_clip, the MLP itself or its layers as
// loratune's imports call them; `intermediate` then `output` in transformers, whose `output` adds the residual, so
// the sum is the same) comes adaptformer_forward(x', y); in the sequential form, adaptformer_forward(y, y). Up starts
// at zero: the adapted model starts as the base.
#pragma once

#include <ATen/Tensor.h>

#include <string>
#include <vector>

#include "loratune/bundle.h"
#include "loratune/method.h"
#include "loratune/named_tensor.h"

namespace loratune {

class MlpAdapters {
 public:
  bool defined() const { return !tensors_.empty(); }
  const AdaptFormerSettings& settings() const { return settings_; }
  // Per block, adaptformer_tensor_names()'s tensors.
  const std::vector<std::vector<at::Tensor>>& tensors() const { return tensors_; }

  // Fresh adapters on every block of `bundle` (Down as nn.Linear initialises, from torch's global generator; Up
  // zero), or ones from a file (InputError naming `origin` where they do not fit); both rewrite the blocks' types the
  // first time (InputError where a block has no MLP to sit beside, or its tokens are not a sequence).
  void init(const AdaptFormerSettings& settings, const Bundle& bundle);
  void set(const AdaptFormerSettings& settings, const Bundle& bundle, const std::vector<std::vector<at::Tensor>>& tensors,
           const std::string& origin);
  // Turns them off (scale 0): the blocks compute the base again.
  void clear();
  void set_trainable(bool on);
  void to(const c10::Device& device);

  // "adaptformer.<block>.<tensor>", for the optimiser and checkpoints.
  void append_trainable(std::vector<NamedTensor>& out) const;
  int64_t parameter_count() const;

 private:
  void prepare(const Bundle& bundle, bool sequential);
  void attach();

  AdaptFormerSettings settings_;
  std::vector<torch::jit::Module> blocks_;
  bool sequential_ = false;  // the form the blocks were rewritten for
  std::vector<std::vector<at::Tensor>> tensors_;
};

}  // namespace loratune
