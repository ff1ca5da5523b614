// How an adapter's A and B start (PEFT's init_lora_weights), separate from the variant that uses them: any variant
// can start from any of these. Some starts take a part of the frozen weight into the adapter (PiSSA, OLoRA): the
// weight's rows become W - s * B0 @ A0, so the adapted model starts as the base, and adapter files return that part
// (a LoRA of rank 2r, as PEFT's conversion) so that they apply to the unmodified base. A new start is one class and
// one line in adapter_inits().
#pragma once

#include <ATen/Tensor.h>

#include <string>
#include <utility>
#include <vector>

#include "loratune/lora.h"

namespace loratune {

class AdapterInit {
 public:
  virtual ~AdapterInit() = default;
  // lora.init's value: PEFT's init_lora_weights ("gaussian", "pissa", "olora"), "kaiming_uniform" for PEFT's true.
  virtual std::string name() const = 0;
  // One line for `--help-config`.
  virtual std::string summary() const = 0;
  // A [rank, in_features] and B [rows, rank] in fp32 for `target`, whose rows of the frozen weight are `base_rows`.
  virtual std::pair<at::Tensor, at::Tensor> start(const LoraTarget& target, const at::Tensor& base_rows) const = 0;
  // Whether the start is a part of the weight (the frozen rows must lose s * B0 @ A0).
  virtual bool takes_from_weight() const { return false; }
};

// The registry, PEFT's default (kaiming_uniform) first.
const std::vector<const AdapterInit*>& adapter_inits();
std::vector<std::string> adapter_init_names();
const AdapterInit& default_adapter_init();
// By name: nullptr when unknown / InputError naming the choices.
const AdapterInit* find_adapter_init(const std::string& name);
const AdapterInit& adapter_init_by_name(const std::string& name);

// The same change of the weight as `target` makes, as an adapter on the unmodified base: where the start took
// s * B0 @ A0 from the weight, A' = [A; A0], B' = [B, -B0], rank 2r and alpha scaled to keep s (2 alpha, or
// sqrt(2) alpha with rslora); other targets unchanged. Tensors on the CPU.
LoraTarget on_unmodified_base(const LoraTarget& target);
// The settings such targets were made with, as on_unmodified_base changes them (rank, alpha and their patterns).
LoraSettings settings_on_unmodified_base(LoraSettings settings);

}  // namespace loratune
