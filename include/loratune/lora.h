// LoRA adapters on the weights of a TorchScript model: y = W x + b + s * B(A(dropout(x))).
// Targets are whole weights (a separate query Linear) or row slices of fused q/k/v weights (a timm `qkv` Linear,
// nn.MultiheadAttention's `in_proj_weight`). Which weights a model offers: targets.h; the variants: adapter_variant.h.
#pragma once

#include <ATen/Tensor.h>

#include <map>
#include <string>
#include <vector>

namespace loratune {

struct LoraSettings {
  int64_t rank = 8;
  double alpha = 16.0;
  double dropout = 0.1;  // on the adapter input, in training
  bool rslora = false;  // scale alpha / sqrt(rank) instead of alpha / rank
  // Target patterns: a module name suffix ("query"), or "re:<regex>" matched against the whole path, optionally
  // followed by ":q,v" to adapt only those slices of a fused q/k/v weight. Empty: the query and value projections
  // of every attention block, whichever layout the model uses.
  std::vector<std::string> targets;
  std::vector<std::string> text_targets;  // the same for a CLIP text tower trained alongside (loss contrastive)
  std::map<std::string, int64_t> rank_pattern;  // pattern -> rank, overriding `rank`
  std::map<std::string, double> alpha_pattern;  // pattern -> alpha, overriding `alpha`
  int64_t last_blocks = -1;  // adapt only the targets inside the last N transformer blocks; < 0: all blocks
  std::string variant = "lora";  // a registered AdapterVariant's name (adapter_variants())
  std::string init = "kaiming_uniform";  // how A and B start: a registered AdapterInit's name (adapter_inits())
};

// Which rows of which weight an adapter sits on: the weight `param` of module `module`, whole or one q/k/v slice of
// a fused [3C, C] weight. The one identity of a target in names, files and maps.
struct TargetKey {
  std::string module;            // dotted path inside the bundle (in adapter files: the original model's path)
  std::string param = "weight";
  std::string slice;             // "" for the whole weight, else "q", "k" or "v"

  // "<module>.<param>[.<slice>]": trainable tensors are named "lora.<name>.<tensor>".
  std::string name() const;
  // First row and number of rows in a weight of `weight_rows` rows (a slice is a third of a fused weight).
  std::pair<int64_t, int64_t> rows_in(int64_t weight_rows) const;
  // The bias beside the weight: "bias" for "weight", "in_proj_bias" for "in_proj_weight".
  std::string bias_param() const;
  bool operator<(const TargetKey& other) const;
  bool operator==(const TargetKey& other) const;
};

class AdapterVariant;
// Plain LoRA, every target's variant unless set otherwise (adapter_variant.h has the others and the registry).
const AdapterVariant& lora_variant();

// One adapter on rows [row_begin, row_begin + rows) of its weight.
struct LoraTarget : TargetKey {
  int64_t row_begin = 0, rows = 0, in_features = 0;
  int64_t rank = 0;
  double alpha = 0.0;
  bool rslora = false;
  const AdapterVariant* variant = &lora_variant();
  std::vector<at::Tensor> tensors;  // the variant's tensors, in the order of its tensor_specs()
  // Where the start took s * B0 @ A0 from the frozen weight (PiSSA, OLoRA): A0 and B0, undefined otherwise
  // (adapter_init.h: files give it back).
  at::Tensor taken_A, taken_B;

  // Whether tensors[k] trains (its variant's spec says; LoRA-FA keeps A fixed).
  bool trains(size_t k) const;
  // Plain LoRA's two tensors: A [rank, in_features], B [rows, rank].
  at::Tensor& A() { return tensors.at(0); }
  at::Tensor& B() { return tensors.at(1); }
  const at::Tensor& A() const { return tensors.at(0); }
  const at::Tensor& B() const { return tensors.at(1); }

  double scale() const;
  std::string describe() const;  // "vit.encoder.layer.0.attention.attention.query [32x32] r=8"
  // Name of its k-th tensor in training, checkpoints and optimiser state: "lora.<name()>.<tensor name>".
  std::string tensor_name(size_t k) const;
};

// The settings' own rules (rank >= 1, alpha > 0, dropout in [0, 1), a registered variant), checked the same way for
// a config, a target list and an adapter file: InputError "<origin>: lora.<key> ..." naming the rule.
void check_lora_settings(const LoraSettings& settings, const std::string& origin);

}  // namespace loratune
