// LoRA adapters on the weights of a TorchScript model: y = W x + b + s * B(A(dropout(x))).
// Targets are whole weights (a separate query Linear) or row slices of fused q/k/v weights (a timm `qkv` Linear,
// nn.MultiheadAttention's `in_proj_weight`).
#pragma once

#include <torch/script.h>

#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

namespace loratune {

struct LoraSettings {
  int64_t rank = 8;
  double alpha = 16.0;
  double dropout = 0.0;
  bool rslora = false;  // scale alpha / sqrt(rank) instead of alpha / rank
  // Target patterns: a module name suffix ("query"), or "re:<regex>" matched against the whole path, optionally
  // followed by ":q,v" to adapt only those slices of a fused q/k/v weight. Empty: the query and value projections
  // of every attention block, whichever layout the model uses.
  std::vector<std::string> targets;
  std::map<std::string, int64_t> rank_pattern;  // pattern -> rank, overriding `rank`
  std::map<std::string, double> alpha_pattern;  // pattern -> alpha, overriding `alpha`
};

// One adapter on rows [row_begin, row_begin + rows) of the weight `param` of module `module`.
struct LoraTarget {
  std::string module;          // dotted path inside the bundle
  std::string param = "weight";
  std::string slice;           // "" for the whole weight, else "q", "k" or "v"
  int64_t row_begin = 0, rows = 0, in_features = 0;
  int64_t rank = 0;
  double alpha = 0.0;
  bool rslora = false;
  at::Tensor A;  // [rank, in_features]
  at::Tensor B;  // [rows, rank]

  double scale() const;
  std::string describe() const;  // "vit.encoder.layer.0.attention.attention.query [32x32] r=8"
};

// Which weights of `module` the settings adapt, with shapes and ranks (tensors not yet created).
// InputError when a pattern matches nothing; the message lists candidate modules.
std::vector<LoraTarget> resolve_targets(const torch::jit::Module& module, const LoraSettings& settings);

// Modules that could carry an adapter (those with a 2-D weight), for error messages and `loratune info`.
std::vector<std::string> candidate_modules(const torch::jit::Module& module);

// A = kaiming-uniform (bound 1/sqrt(in), as PEFT), B = 0, fp32, requires_grad. Uses torch's global generator.
void init_adapter_tensors(std::vector<LoraTarget>& targets);

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
  // Human-readable notes from preparation (e.g. where dropout cannot apply).
  const std::vector<std::string>& notes() const { return notes_; }

 private:
  void prepare_type(const c10::ClassTypePtr& type, const std::string& param, const std::string& example_path);

  torch::jit::Module root_;
  std::vector<std::pair<std::string, torch::jit::Module>> modules_;  // every module, by path
  std::map<const c10::ClassType*, LoraWiring> prepared_;
  std::map<const c10::ClassType*, std::string> prepared_param_;
  std::set<std::string> attached_;
  std::vector<std::string> notes_;
};

}  // namespace loratune
