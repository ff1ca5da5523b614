// Visual prompt tuning (Jia et al. 2022, method vpt): learned tokens joined to the token sequence the transformer
// blocks see, before the first block only (shallow) or before every block, each block's own replacing the previous
// block's outputs at their places (deep), and dropped before the head. Blocks treat tokens as a set (positions were
// added in the stem), so the tokens go after the sequence: the paper's [CLS, prompts, patches] in another order.
#pragma once

#include <ATen/Tensor.h>

#include <string>
#include <vector>

#include "loratune/bundle.h"
#include "loratune/method.h"
#include "loratune/named_tensor.h"

namespace loratune {

// Where the blocks' token sequence runs: [batch, tokens, width] (sequence_dim 1) or [tokens, batch, width] (0).
struct TokenLayout {
  int64_t sequence_dim = 1;
  int64_t batch_dim = 0;
  int64_t width = 0;
};

// The stem's output layout, probed on two batch sizes; InputError where the blocks do not see a token sequence
// (MobileCLIP's convolutional stages) or the bundle has no stem/blocks/head structure, naming `method`.
TokenLayout token_layout(const Bundle& bundle, Method method = Method::kVpt);

class PromptTokens {
 public:
  bool defined() const { return !sets_.empty(); }
  const PromptSettings& settings() const { return settings_; }
  const TokenLayout& layout() const { return layout_; }
  // One [tokens, width] tensor per set: one (shallow) or one per block (deep).
  const std::vector<at::Tensor>& sets() const { return sets_; }

  // Fresh sets, uniform in +-sqrt(6 / (tokens + width)) (Xavier's bound for a [tokens, width] matrix), from torch's
  // global generator.
  void init(const PromptSettings& settings, const TokenLayout& layout, int64_t blocks);
  // Sets from a file (fp32 copies); InputError naming `origin` where their number or shapes do not fit.
  void set(const PromptSettings& settings, const TokenLayout& layout, int64_t blocks, const std::vector<at::Tensor>& sets,
           const std::string& origin);
  void clear() { sets_.clear(); }
  void set_trainable(bool on);
  void to(const c10::Device& device);

  // `h` (base_tokens long) with the set of `block` after it, in h's dtype; deep: `h` may carry the previous set.
  at::Tensor join(const at::Tensor& h, int64_t base_tokens, int64_t block) const;
  // Whether a set goes in before `block`.
  bool joins_before(int64_t block) const { return defined() && (block == 0 || settings_.deep); }
  at::Tensor drop(const at::Tensor& h, int64_t base_tokens) const;

  // "vpt.prompts.<set>", for the optimiser and checkpoints.
  void append_trainable(std::vector<NamedTensor>& out) const;
  int64_t parameter_count() const;

 private:
  PromptSettings settings_;
  TokenLayout layout_;
  std::vector<at::Tensor> sets_;
};

}  // namespace loratune
