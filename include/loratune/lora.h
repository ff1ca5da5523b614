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
  int64_t last_blocks = -1;  // adapt only the targets inside the last N transformer blocks; < 0: all blocks
  std::string variant = "lora";  // lora | dora (see AdapterVariant)
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
  bool operator<(const TargetKey& other) const;
  bool operator==(const TargetKey& other) const;
};

class AdapterVariant;
// Plain LoRA: W + s * B @ A.
const AdapterVariant& lora_variant();
// DoRA (Liu et al. 2024): m * (W + s * B @ A) / ||W + s * B @ A|| per output row, with the trained magnitude m
// initialised from the row norms of W; the norm is treated as a constant in backward, as PEFT does.
const AdapterVariant& dora_variant();
// By name ("lora", "dora"); InputError naming the choices otherwise.
const AdapterVariant& variant_by_name(const std::string& name);

// One adapter on rows [row_begin, row_begin + rows) of its weight.
struct LoraTarget : TargetKey {
  int64_t row_begin = 0, rows = 0, in_features = 0;
  int64_t rank = 0;
  double alpha = 0.0;
  bool rslora = false;
  const AdapterVariant* variant = &lora_variant();
  std::vector<at::Tensor> tensors;  // the variant's tensors, in the order of its tensor_names()

  // Plain LoRA's two tensors: A [rank, in_features], B [rows, rank].
  at::Tensor& A() { return tensors.at(0); }
  at::Tensor& B() { return tensors.at(1); }
  const at::Tensor& A() const { return tensors.at(0); }
  const at::Tensor& B() const { return tensors.at(1); }

  double scale() const;
  std::string describe() const;  // "vit.encoder.layer.0.attention.attention.query [32x32] r=8"
};

// An adapter variant: its tensors (names, shapes, initialisation, which may read the base weight), the TorchScript
// code that applies them inside the rewritten graph, and how it folds into the weight at merge. Plain LoRA
// (W + s * B @ A) is the first implementation; a variant is chosen per target.
class AdapterVariant {
 public:
  virtual ~AdapterVariant() = default;
  virtual std::string name() const = 0;
  // Tensor names, in order: "A", "B" for LoRA. Adapter files store them as "<module>.lora_<name>[.<slice>].weight";
  // the rewritten modules hold them in list attributes "lora_<name>", one entry per slice.
  virtual const std::vector<std::string>& tensor_names() const = 0;
  // Creates the tensors of `target` (fp32, trainable); `base_rows` are the adapted rows of the frozen weight.
  virtual void init(LoraTarget& target, const at::Tensor& base_rows) const = 0;
  // Checks loaded tensors against the target's rank and shapes (InputError naming `origin`).
  virtual void check(const LoraTarget& target, const std::string& origin) const = 0;
  // TorchScript methods added to each rewritten module type. `lora_forward(self, x, y)` adds the adapter's output
  // to y = linear(x, W, b) (activation wiring; nullptr: the variant needs the weight wiring everywhere);
  // `lora_weight(self, w)` returns the adapted weight (weight wiring).
  // Both read lora_enabled, lora_training, lora_dropout, lora_scale, lora_rows and the tensor lists.
  virtual const char* activation_code() const = 0;
  virtual const char* weight_code() const = 0;
  // The adapted rows after merging at `strength` (0: base, 1: adapted), computed in fp32.
  virtual at::Tensor merged_rows(const LoraTarget& target, const at::Tensor& base_rows, double strength) const = 0;
};

// Which weights of `module` the settings adapt, with shapes and ranks (tensors not yet created).
// InputError when a pattern matches nothing; the message lists candidate modules.
// "all-linear" in lora.targets selects every 2-D weight inside `blocks_path` (the bundle's transformer blocks) that
// the model's code reads.
std::vector<LoraTarget> resolve_targets(const torch::jit::Module& module, const LoraSettings& settings,
                                        const std::string& blocks_path = "");

// True when some code of the model reads the weight `param` of the module at `module_path`.
bool weight_is_read(const torch::jit::Module& root, const std::string& module_path, const std::string& param);

// Modules that could carry an adapter (those with a 2-D weight), for error messages and `loratune info`.
std::vector<std::string> candidate_modules(const torch::jit::Module& module);

// Each target's variant creates its tensors (LoRA: A kaiming-uniform with bound 1/sqrt(in) as PEFT, B = 0; fp32,
// requires_grad) from torch's global generator. `module` is the model the targets were resolved on.
void init_adapter_tensors(std::vector<LoraTarget>& targets, const torch::jit::Module& module);

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
  void prepare_type(const c10::ClassTypePtr& type, const std::string& param, const std::string& example_path,
                    const AdapterVariant& variant);

  torch::jit::Module root_;
  std::vector<std::pair<std::string, torch::jit::Module>> modules_;  // every module, by path
  std::map<const c10::ClassType*, LoraWiring> prepared_;
  std::map<const c10::ClassType*, std::string> prepared_param_;
  std::map<const c10::ClassType*, const AdapterVariant*> prepared_variant_;
  std::set<std::string> attached_;
  std::vector<std::string> notes_;
};

}  // namespace loratune
