// Adapter slots in the module types of a loaded TorchScript model: the graph rewrite behind Model's adapters.
#pragma once

#include <torch/script.h>

#include <map>
#include <set>
#include <string>
#include <vector>

#include "loratune/adapter_variant.h"

namespace loratune {

// True when some code of the model reads the weight `param` of the module at `module_path`.
bool weight_is_read(const torch::jit::Module& root, const std::string& module_path, const std::string& param);

// Where a module type's weight `param` is read, over the methods of every module in `modules` (lora_* methods
// excluded): reads by the type's own methods that only feed aten::linear allow activation wiring and quantisation;
// other readers see the weight itself.
struct WeightReads {
  size_t count = 0;
  bool only_own_linear = true;
  std::vector<torch::jit::Module> foreign_readers;  // one module per other type whose code reads the weight
};
WeightReads weight_reads(const std::vector<std::pair<std::string, torch::jit::Module>>& modules,
                         const c10::ClassTypePtr& type, const std::string& param);

// How an adapted weight is wired into the model's code.
enum class LoraWiring {
  kActivation,   // low-rank term added after each aten::linear that reads the weight (dropout applies)
  kWeightDelta,  // every read of the weight sees W + s*B@A (other code paths, e.g. nn.MultiheadAttention)
};

// Adds adapter slots to the module types of a loaded TorchScript model and binds adapter tensors to them.
// Rewriting happens once per module type, so it must happen before the model's first forward call.
class AdapterHost {
 public:
  explicit AdapterHost(torch::jit::Module root);

  // Makes the module types that own these targets able to carry adapters (idempotent per type).
  void prepare(const std::vector<LoraTarget>& targets);
  // Binds the tensors of `targets` (all prepared) and enables them; other prepared modules are disabled.
  void attach(const std::vector<LoraTarget>& targets, double dropout);
  // Disables every adapter: the model computes its base function again.
  void detach();
  // LoRA dropout on (training) or off.
  void set_training(bool training);

  LoraWiring wiring(const std::string& module_path) const;
  // Whether LoRA dropout reaches any attached adapter (only activation-wired ones take it).
  bool dropout_applies() const;
  // One line when `dropout` > 0 and some attached adapters change the weight itself, so dropout skips them; else "".
  std::string dropout_note(double dropout) const;

 private:
  void prepare_type(const c10::ClassTypePtr& type, const std::string& param, const std::string& example_path,
                    const AdapterVariant& variant);

  torch::jit::Module root_;
  std::vector<std::pair<std::string, torch::jit::Module>> modules_;  // every module, by path
  std::map<const c10::ClassType*, LoraWiring> prepared_;
  std::map<const c10::ClassType*, std::string> prepared_param_;
  std::map<const c10::ClassType*, const AdapterVariant*> prepared_variant_;
  std::set<std::string> attached_;
  std::map<std::string, std::string> weight_delta_kinds_;  // "Linear, dora" -> an example module path
};

}  // namespace loratune
