// Adds adapter slots to TorchScript module types by rewriting their graphs.
//
// Scripted models share one ClassType (and one graph) among modules of the same Python class, so adapter
// attributes go onto every instance of a prepared type (disabled where there is no adapter), and the graph is
// rewritten once per type. Traced models have one type per instance; the same code handles both.
#include <torch/csrc/jit/ir/ir.h>
#include <torch/csrc/jit/runtime/graph_iterator.h>

#include <sstream>

#include "common/torch_compat.h"
#include "loratune/errors.h"
#include "lora/adapter_host.h"
#include "common/strings.h"

namespace loratune {
namespace {

using torch::jit::Graph;
using torch::jit::Node;
using torch::jit::Value;

// Attributes every prepared module gets, besides the variant's tensor lists "lora_<tensor>".
constexpr const char* kAttributes[] = {"lora_enabled", "lora_training", "lora_dropout", "lora_scale", "lora_rows"};

std::vector<std::string> tensor_attributes(const AdapterVariant& variant) {
  std::vector<std::string> names;
  for (const auto& spec : variant.tensor_specs()) names.push_back("lora_" + spec.name);
  return names;
}

bool is_lora_method(const std::string& name) { return name.rfind("lora_", 0) == 0; }

// Every node, nested blocks included.
template <typename F>
void for_each_node(std::shared_ptr<Graph> graph, F&& f) {
  torch::jit::DepthFirstGraphNodeIterator it(graph);
  for (Node* n = it.next(); n != nullptr; n = it.next()) f(n);
}

// aten::linear, or the call that replaces it in models with quantised frozen weights (src/quant).
bool is_linear_call(const Node* n) {
  static const c10::Symbol frozen_linear = c10::Symbol::fromQualString("loratune::frozen_linear");
  return n->kind() == c10::aten::linear || n->kind() == frozen_linear;
}

bool reads_attribute(const Node* n, const std::string& name) {
  return n->kind() == c10::prim::GetAttr && n->s(c10::attr::name) == name;
}

// Attribute slots on every instance of `type`, disabled until attach.
void register_slots(std::vector<std::pair<std::string, torch::jit::Module>>& modules, const c10::ClassTypePtr& type,
                    const AdapterVariant& variant) {
  for (auto& [path, module] : modules) {
    if (module.type() != type) continue;
    module.register_attribute("lora_enabled", c10::BoolType::get(), false);
    module.register_attribute("lora_training", c10::BoolType::get(), false);
    module.register_attribute("lora_dropout", c10::FloatType::get(), 0.0);
    for (const auto& name : tensor_attributes(variant))
      module.register_attribute(name, c10::ListType::ofTensors(), c10::List<at::Tensor>());
    module.register_attribute("lora_scale", c10::ListType::ofFloats(), c10::List<double>());
    module.register_attribute("lora_rows", c10::ListType::ofInts(), c10::List<int64_t>());
  }
}

// Activation wiring: after each aten::linear fed by a read of the weight, y = self.lora_forward(x, y).
void add_after_linears(const std::shared_ptr<Graph>& graph, const std::vector<Node*>& getters) {
  Value* self = graph->inputs()[0];
  for (Node* get : getters) {
    std::vector<Node*> linears;
    for (const auto& use : get->output()->uses()) linears.push_back(use.user);
    for (Node* linear : linears) {
      Node* call = graph->create(c10::prim::CallMethod, {self, linear->input(0), linear->output()}, 1);
      call->s_(c10::attr::name, "lora_forward");
      call->output()->setType(c10::TensorType::get());
      call->insertAfter(linear);
      linear->output()->replaceAllUsesAfterNodeWith(call, call->output());
    }
  }
}

// Weight wiring: one W + s*B@A per call of the method, at its top, seen by every read (`getters`, removed); `method`
// is lora_weight, or lora_bias for the bias of a variant that changes it.
void adapt_weight_at_top(const std::shared_ptr<Graph>& graph, const std::string& param, const std::vector<Node*>& getters,
                         const char* method) {
  Value* self = graph->inputs()[0];
  Node* first = *graph->nodes().begin();
  Node* get = graph->create(c10::prim::GetAttr, {self}, 1);
  get->s_(c10::attr::name, param);
  get->output()->setType(c10::TensorType::get());
  get->insertBefore(first);
  Node* call = graph->create(c10::prim::CallMethod, {self, get->output()}, 1);
  call->s_(c10::attr::name, method);
  call->output()->setType(c10::TensorType::get());
  call->insertAfter(get);
  for (Node* old : getters) {
    old->output()->replaceAllUsesWith(call->output());
    old->destroy();
  }
}

// Reads of the weight by another module's code (`reader`): what they get passes through the adapted module's
// `method` (lora_weight, or lora_bias).
void adapt_foreign_reads(const torch::jit::Module& reader, const c10::ClassTypePtr& type, const std::string& param,
                         const char* method) {
  for (const auto& code : reader.get_methods()) {
    if (is_lora_method(code.name())) continue;
    auto graph = compat::method_graph(code.function());
    std::vector<Node*> getters;
    for_each_node(graph, [&](Node* n) {
      if (reads_attribute(n, param) && n->input(0)->type() == type &&
          !(reader.type() == type && n->input(0) == graph->inputs()[0]))
        getters.push_back(n);
    });
    for (Node* get : getters) {
      Node* call = graph->create(c10::prim::CallMethod, {get->input(0), get->output()}, 1);
      call->s_(c10::attr::name, method);
      call->output()->setType(c10::TensorType::get());
      call->insertAfter(get);
      get->output()->replaceAllUsesAfterNodeWith(call, call->output());
    }
    graph->lint();
  }
}

}  // namespace

bool weight_is_read(const torch::jit::Module& root, const std::string& module_path, const std::string& param) {
  torch::jit::Module target;
  std::vector<std::pair<std::string, torch::jit::Module>> modules;
  for (const auto& nm : root.named_modules()) {
    modules.emplace_back(nm.name, nm.value);
    if (nm.name == module_path) target = nm.value;
  }
  if (!target._ivalue()) return false;
  const auto type = target.type();
  bool read = false;
  std::set<const c10::ClassType*> seen;
  for (const auto& [path, module] : modules) {
    if (!seen.insert(module.type().get()).second) continue;
    for (const auto& method : module.get_methods()) {
      if (is_lora_method(method.name())) continue;
      auto graph = compat::method_graph(method.function());
      for_each_node(graph, [&](Node* n) {
        if (!reads_attribute(n, param) || n->input(0)->type() != type) return;
        read = true;
      });
    }
  }
  return read;
}

WeightReads weight_reads(const std::vector<std::pair<std::string, torch::jit::Module>>& modules,
                         const c10::ClassTypePtr& type, const std::string& param) {
  WeightReads reads;
  std::set<const c10::ClassType*> seen;
  for (const auto& [path, module] : modules) {
    if (!seen.insert(module.type().get()).second) continue;
    bool reads_here = false;
    for (const auto& method : module.get_methods()) {
      if (is_lora_method(method.name())) continue;
      auto graph = compat::method_graph(method.function());
      for_each_node(graph, [&](Node* n) {
        if (!reads_attribute(n, param) || n->input(0)->type() != type) return;
        ++reads.count;
        if (module.type() != type || n->input(0) != graph->inputs()[0]) {
          reads.only_own_linear = false;
          reads_here = true;
          return;
        }
        for (const auto& use : n->output()->uses())
          if (!is_linear_call(use.user) || use.offset != 1) reads.only_own_linear = false;
      });
    }
    if (reads_here) reads.foreign_readers.push_back(module);
  }
  return reads;
}

AdapterHost::AdapterHost(torch::jit::Module root) : root_(std::move(root)) {
  for (const auto& nm : root_.named_modules()) modules_.emplace_back(nm.name, nm.value);
}

void AdapterHost::prepare(const std::vector<LoraTarget>& targets) {
  for (const auto& t : targets) {
    auto it = std::find_if(modules_.begin(), modules_.end(), [&](const auto& m) { return m.first == t.module; });
    if (it == modules_.end()) throw InputError("the model has no module " + t.module);
    const auto type = it->second.type();
    auto done = prepared_param_.find(type.get());
    if (done != prepared_param_.end()) {
      if (done->second != t.param)
        throw InputError("cannot adapt " + t.param + " of " + t.module + ": modules of its type already carry "
                         "adapters on " + done->second);
      continue;
    }
    prepare_type(type, t.param, t.module, *t.variant);
  }
}

void AdapterHost::prepare_type(const c10::ClassTypePtr& type, const std::string& param, const std::string& example,
                               const AdapterVariant& variant) {
  std::vector<std::string> attributes(std::begin(kAttributes), std::end(kAttributes));
  for (const auto& name : tensor_attributes(variant)) attributes.push_back(name);
  for (const auto& name : attributes)
    if (type->hasAttribute(name))
      throw InputError("module " + example + " already has an attribute " + name +
                       "; export the base model without adapters (merge them first)");

  const WeightReads reads = weight_reads(modules_, type, param);
  if (reads.count == 0) throw InputError("cannot adapt " + example + ": its code never reads " + param);
  const bool only_linear = reads.only_own_linear;
  const LoraWiring wiring =
      only_linear && variant.activation_code() != nullptr ? LoraWiring::kActivation : LoraWiring::kWeightDelta;

  // A variant that changes the bias (SSF's shift) needs one to fold into at merge, and the weight wiring rewrites
  // its reads as well.
  auto owner = std::find_if(modules_.begin(), modules_.end(), [&](const auto& m) { return m.second.type() == type; });
  const std::string bias = TargetKey{example, param, ""}.bias_param();
  const bool adapts_bias = variant.bias_code() != nullptr;
  if (adapts_bias && (!owner->second.hasattr(bias) || !owner->second.attr(bias).isTensor()))
    throw InputError("lora.variant " + variant.name() + " cannot adapt " + example + ": it has no " + bias +
                     " to fold the shift into; choose targets with a bias, or another variant");

  register_slots(modules_, type, variant);
  owner->second.define(wiring == LoraWiring::kActivation ? variant.activation_code() : variant.weight_code());
  const bool wires_bias = adapts_bias && wiring == LoraWiring::kWeightDelta;
  if (wires_bias) owner->second.define(variant.bias_code());
  for (torch::jit::Function* fn : type->methods()) {
    if (is_lora_method(fn->name())) continue;
    auto graph = compat::method_graph(*fn);
    auto own_reads = [&](const std::string& name) {
      std::vector<Node*> getters;
      for_each_node(graph, [&](Node* n) {
        if (reads_attribute(n, name) && n->input(0) == graph->inputs()[0]) getters.push_back(n);
      });
      return getters;
    };
    const std::vector<Node*> getters = own_reads(param);
    const std::vector<Node*> bias_getters = wires_bias ? own_reads(bias) : std::vector<Node*>{};
    if (!getters.empty() && wiring == LoraWiring::kActivation) add_after_linears(graph, getters);
    if (!getters.empty() && wiring == LoraWiring::kWeightDelta) adapt_weight_at_top(graph, param, getters, "lora_weight");
    if (!bias_getters.empty()) adapt_weight_at_top(graph, bias, bias_getters, "lora_bias");
    graph->lint();
  }
  for (auto& reader : reads.foreign_readers) adapt_foreign_reads(reader, type, param, "lora_weight");
  if (wires_bias)
    for (auto& reader : weight_reads(modules_, type, bias).foreign_readers)
      adapt_foreign_reads(reader, type, bias, "lora_bias");
  prepared_[type.get()] = wiring;
  prepared_param_[type.get()] = param;
  prepared_variant_[type.get()] = &variant;
  // Traced models have a type per module instance: one kind per class name and reason.
  if (wiring == LoraWiring::kWeightDelta && variant.low_rank())  // only LoRA's A takes dropout
    weight_delta_kinds_.emplace(
        type->name()->name() + (only_linear ? ", " + variant.name() : ", " + param + " read outside nn.Linear"), example);
}

bool AdapterHost::dropout_applies() const {
  for (const auto& [path, module] : modules_)
    if (attached_.count(path) && prepared_.at(module.type().get()) == LoraWiring::kActivation &&
        prepared_variant_.at(module.type().get())->low_rank())
      return true;
  return false;
}

std::string AdapterHost::dropout_note(double dropout) const {
  if (dropout <= 0 || weight_delta_kinds_.empty()) return "";
  std::vector<std::string> kinds;
  for (const auto& [kind, example] : weight_delta_kinds_) kinds.push_back(kind + " (e.g. " + example + ")");
  std::ostringstream value;
  value << dropout;
  return "lora.dropout " + value.str() + " does not apply to adapters that change the weight itself: " +
         join(kinds, "; ") + (dropout_applies() ? "; those train without it" : "; the run trains without dropout "
                              "(set lora.dropout to 0 to say so)");
}

void AdapterHost::attach(const std::vector<LoraTarget>& targets, double dropout) {
  std::map<std::string, std::vector<const LoraTarget*>> by_module;
  for (const auto& t : targets) by_module[t.module].push_back(&t);
  attached_.clear();
  for (auto& [path, module] : modules_) {
    if (!prepared_.count(module.type().get())) continue;
    const AdapterVariant& variant = *prepared_variant_.at(module.type().get());
    std::vector<c10::List<at::Tensor>> lists(variant.tensor_specs().size());
    c10::List<double> scale;
    c10::List<int64_t> rows;
    auto it = by_module.find(path);
    if (it != by_module.end()) {
      auto slices = it->second;
      std::sort(slices.begin(), slices.end(), [](auto* a, auto* b) { return a->row_begin < b->row_begin; });
      for (const LoraTarget* t : slices) {
        if (t->variant != &variant)
          throw InputError("adapter " + t->describe() + " is a " + t->variant->name() + " adapter, but modules of its "
                           "type were prepared for " + variant.name());
        for (size_t k = 0; k < lists.size(); ++k) lists[k].push_back(t->tensors.at(k));
        scale.push_back(t->scale());
        rows.push_back(t->row_begin);
      }
      attached_.insert(path);
    }
    const auto names = tensor_attributes(variant);
    for (size_t k = 0; k < lists.size(); ++k) module.setattr(names[k], lists[k]);
    module.setattr("lora_scale", scale);
    module.setattr("lora_rows", rows);
    module.setattr("lora_dropout", dropout);
    module.setattr("lora_enabled", it != by_module.end());
  }
  for (const auto& [path, list] : by_module)
    if (!attached_.count(path)) throw InputError("adapter module " + path + " was not prepared");
}

void AdapterHost::detach() {
  for (auto& [path, module] : modules_)
    if (prepared_.count(module.type().get())) module.setattr("lora_enabled", false);
  attached_.clear();
}

void AdapterHost::set_training(bool training) {
  for (auto& [path, module] : modules_)
    if (prepared_.count(module.type().get())) module.setattr("lora_training", training);
}

LoraWiring AdapterHost::wiring(const std::string& module_path) const {
  for (const auto& [path, module] : modules_)
    if (path == module_path) {
      auto it = prepared_.find(module.type().get());
      if (it != prepared_.end()) return it->second;
    }
  throw InputError("module " + module_path + " carries no adapter");
}

}  // namespace loratune
