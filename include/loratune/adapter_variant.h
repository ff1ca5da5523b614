// Adapter variants: what one adapter on a weight is made of and how it acts. A variant owns its tensors (names,
// shapes, which ones LoRA+ speeds up), its PEFT flag, its initialisation, the TorchScript code that applies it inside
// the rewritten graph and how it folds into the weight (and bias) at merge. Low-rank variants (LoRA, DoRA, LoRA-FA)
// start with A and B; SSF is a per-row scale and shift of the weight's outputs. The file format, the config, `loratune info` and
// the optimiser ask the registry; a new variant is one class, one line in adapter_variants() and its reference
// fixture.
#pragma once

#include <ATen/Tensor.h>

#include <string>
#include <vector>

#include "loratune/lora.h"

namespace loratune {

class AdapterInit;

// A dimension of an adapter tensor, in terms of its target.
enum class AdapterDim { kRank, kInFeatures, kRows };

struct AdapterTensorSpec {
  // "A", "B", "magnitude_vector": adapter files store "<module>.lora_<name>[.<slice>].weight", rewritten modules
  // hold list attributes "lora_<name>" (one entry per slice), training names it LoraTarget::tensor_name.
  std::string name;
  std::vector<AdapterDim> shape;
  bool up_projection = false;  // LoRA+ (optim.lora_plus_ratio) trains it at that multiple of the learning rate
  bool trainable = true;       // false: fixed at its initialisation (not in Model::trainable(), no weight decay)

  std::vector<int64_t> shape_for(const LoraTarget& target) const;
};

class AdapterVariant {
 public:
  virtual ~AdapterVariant() = default;
  virtual std::string name() const = 0;
  // One line for `--help-config`: what it is and where it comes from.
  virtual std::string summary() const = 0;
  // The key in PEFT's adapter_config.json that is true for this variant ("use_dora"); empty for plain LoRA.
  virtual std::string peft_flag() const = 0;
  // Its tensors, in order; a low-rank variant's start with LoRA's A [rank, in_features] and B [rows, rank].
  virtual const std::vector<AdapterTensorSpec>& tensor_specs() const = 0;
  // Whether it has LoRA's A and B: rank, alpha, lora.init and PEFT's LoRA config apply to it.
  virtual bool low_rank() const { return true; }
  // Creates the tensors of `target` (fp32, requiring gradients where their specs train), A and B as `start` gives
  // them; `base_rows` are the adapted rows of the frozen weight as they were before the start took anything.
  virtual void init(LoraTarget& target, const at::Tensor& base_rows, const AdapterInit& start) const = 0;
  // TorchScript methods added to each rewritten module type. `lora_forward(self, x, y)` adds the adapter's output
  // to y = linear(x, W, b) (activation wiring; nullptr: the variant needs the weight wiring everywhere);
  // `lora_weight(self, w)` returns the adapted weight (weight wiring); with the weight wiring, a variant that changes
  // the bias also defines `lora_bias(self, b)` (bias_code; nullptr: the bias stays as it is).
  // They read lora_enabled, lora_training, lora_dropout, lora_scale, lora_rows and the tensor lists.
  virtual const char* activation_code() const = 0;
  virtual const char* weight_code() const = 0;
  virtual const char* bias_code() const { return nullptr; }
  // The adapted rows after merging at `strength` (0: base, 1: adapted), computed in fp32; the same for the bias
  // (only called when bias_code() is set).
  virtual at::Tensor merged_rows(const LoraTarget& target, const at::Tensor& base_rows, double strength) const = 0;
  virtual at::Tensor merged_bias_rows(const LoraTarget& target, const at::Tensor& base_rows, double strength) const;

  // Trained values per target: the sum of its tensors' sizes.
  int64_t parameter_count(const LoraTarget& target) const;
  // Checks a target's tensors against its specs (InputError naming `origin`, the target and the variant).
  void check(const LoraTarget& target, const std::string& origin) const;
};

// The registry: every variant, plain LoRA first.
const std::vector<const AdapterVariant*>& adapter_variants();
std::vector<std::string> variant_names();
// By name: nullptr when unknown / InputError naming the choices.
const AdapterVariant* find_variant(const std::string& name);
const AdapterVariant& variant_by_name(const std::string& name);

}  // namespace loratune
