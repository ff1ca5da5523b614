#include "quant/frozen_weights.h"

#include <torch/csrc/jit/ir/ir.h>
#include <torch/csrc/jit/runtime/graph_iterator.h>

#include <map>
#include <set>

#include "common/torch_compat.h"
#include "lora/adapter_host.h"
#include "loratune/cpu_allocator.h"

namespace loratune {
namespace {

using torch::jit::Graph;
using torch::jit::Node;
using torch::jit::Value;

bool in_scope(const std::string& path, const std::vector<std::string>& scopes) {
  for (const auto& scope : scopes)
    if (path == scope || path.rfind(scope + ".", 0) == 0) return true;
  return false;
}

bool reads_own_weight(const Node* n, const Value* self) {
  const Node* get = n->input(1)->node();
  return get->kind() == c10::prim::GetAttr && get->s(c10::attr::name) == "weight" && get->input(0) == self;
}

Value* read_attribute(Graph& graph, Value* self, const std::string& name, const c10::TypePtr& type) {
  Node* get = graph.insertNode(graph.create(c10::prim::GetAttr, {self}, 1));
  get->s_(c10::attr::name, name);
  get->output()->setType(type);
  return get->output();
}

// Every aten::linear on the module's own weight becomes loratune::frozen_linear, which reads the quantised weight
// where the instance has one (frozen_format != 0) and is the plain linear elsewhere.
void rewrite_type(const c10::ClassTypePtr& type) {
  static const c10::Symbol frozen_linear = c10::Symbol::fromQualString("loratune::frozen_linear");
  for (torch::jit::Function* fn : type->methods()) {
    if (fn->name().rfind("lora_", 0) == 0) continue;
    auto graph = compat::method_graph(*fn);
    Value* self = graph->inputs()[0];
    std::vector<Node*> linears;
    torch::jit::DepthFirstGraphNodeIterator it(graph);
    for (Node* n = it.next(); n != nullptr; n = it.next())
      if (n->kind() == c10::aten::linear && reads_own_weight(n, self)) linears.push_back(n);
    for (Node* linear : linears) {
      torch::jit::WithInsertPoint guard(linear);
      Value* format = read_attribute(*graph, self, "frozen_format", c10::IntType::get());
      Value* shape = read_attribute(*graph, self, "frozen_shape", c10::ListType::ofInts());
      Value* data = read_attribute(*graph, self, "frozen_data", c10::TensorType::get());
      Value* scale = read_attribute(*graph, self, "frozen_scale", c10::TensorType::get());
      Value* scale2 = read_attribute(*graph, self, "frozen_scale2", c10::TensorType::get());
      Value* call = graph->insert(frozen_linear, {linear->input(0), linear->input(1), linear->input(2), format, shape,
                                                  data, scale, scale2});
      linear->output()->replaceAllUsesWith(call);
      linear->destroy();
    }
    graph->lint();
  }
}

// Replaces one Linear's dense weight by its quantised slots (the dense tensor is released when this returns).
void quantize_module(torch::jit::Module& module, QuantFormat format, const c10::Device& device,
                     FrozenQuantization& result) {
  const at::Tensor weight = module.attr("weight").toTensor();
  const QuantizedWeight q = quantize_weight(weight.to(device), format);
  module.setattr("frozen_format", static_cast<int64_t>(format));
  module.setattr("frozen_shape", c10::List<int64_t>(q.shape));
  module.setattr("frozen_data", q.data);
  module.setattr("frozen_scale", q.scale);
  module.setattr("frozen_scale2", q.scale2);
  module.register_parameter("weight", at::empty({0}, weight.options()), false);
  ++result.modules;
  result.parameters += weight.numel();
  result.dense_bytes += static_cast<int64_t>(weight.nbytes());
  result.stored_bytes += q.bytes();
}

}  // namespace

bool is_quantized_weight_buffer(const std::string& name) {
  const size_t dot = name.rfind('.');
  return name.compare(dot == std::string::npos ? 0 : dot + 1, 7, "frozen_") == 0;
}

FrozenQuantization quantize_frozen_linears(torch::jit::Module root, const std::vector<std::string>& scopes,
                                           QuantFormat format, const c10::Device& device) {
  std::vector<std::pair<std::string, torch::jit::Module>> modules;
  for (const auto& nm : root.named_modules()) modules.emplace_back(nm.name, nm.value);
  FrozenQuantization result;
  result.format = format;
  std::map<const c10::ClassType*, bool> quantizable;  // per type: its weight only feeds its own linear
  std::vector<std::pair<std::string, torch::jit::Module>> chosen;
  std::set<const c10::ClassType*> chosen_types;
  for (const auto& [path, module] : modules) {
    if (!in_scope(path, scopes) || !module.type()->hasAttribute("weight")) continue;
    const c10::IValue weight = module.attr("weight");
    if (!weight.isTensor() || weight.toTensor().dim() != 2 || !weight.toTensor().is_floating_point()) continue;
    const auto type = module.type();
    auto [it, fresh] = quantizable.emplace(type.get(), false);
    if (fresh) {
      const WeightReads reads = weight_reads(modules, type, "weight");
      it->second = reads.count > 0 && reads.only_own_linear && !type->hasAttribute("frozen_format");
    }
    if (!it->second) {
      result.kept.push_back(path + " (its weight is read by other code than its linear: a DoRA adapter, attention)");
      continue;
    }
    chosen.emplace_back(path, module);
    chosen_types.insert(type.get());
  }
  // Slots on every instance of a chosen type (the type's code reads them), then the rewrite, once per type.
  std::set<const c10::ClassType*> rewritten;
  for (auto& [path, module] : modules) {
    if (!chosen_types.count(module.type().get())) continue;
    module.register_attribute("frozen_format", c10::IntType::get(), int64_t{0});
    module.register_attribute("frozen_shape", c10::ListType::ofInts(), c10::List<int64_t>());
    for (const char* name : {"frozen_data", "frozen_scale", "frozen_scale2"}) module.register_buffer(name, at::empty({0}));
    if (rewritten.insert(module.type().get()).second) rewrite_type(module.type());
  }
  for (auto& [path, module] : chosen) {
    quantize_module(module, format, device, result);
    result.quantized.push_back(path);
    // The dense weight and the temporaries go back to the system one weight at a time: loading peaks at the dense
    // model, not at the dense model plus its quantised copy.
    release_cached_cpu_memory();
  }
  return result;
}

}  // namespace loratune
