// The TorchScript -> ONNX conversion: the frozen, inlined forward graph is executed node by node on two example
// batches; each node's values in both runs decide what it becomes. A value that is the same in both runs and does
// not come from the images is a constant (an initializer where a tensor is needed); a tensor computed from the images
// is an ONNX value; an integer that differs between the runs (the batch size and what is computed from it) is an
// int64 ONNX value. Branches take the side both runs took.
#include "loratune/onnx_export.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/jit/api/function_impl.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <map>
#include <set>
#include <unordered_map>

#include "export/onnx_proto.h"
#include "loratune/errors.h"

namespace loratune {
namespace {

using torch::jit::Block;
using torch::jit::Node;
using torch::jit::Value;
using onnx::Attribute;

// Two batch sizes whose floor divisions by 2..5 differ, so that sizes computed from the batch show as such.
constexpr int64_t kBatchA = 2, kBatchB = 5;
constexpr double kPi = 3.14159265358979323846;

// A TorchScript value as the conversion knows it.
struct Val {
  c10::IValue a, b;                 // in the run with kBatchA and with kBatchB images
  std::string name;                 // an ONNX value computed at run time; empty: a constant (a == b)
  std::vector<std::string> names;   // a list of run-time tensors (unbind, chunk, a list being built)
  bool dynamic() const { return !name.empty() || !names.empty(); }
};

bool same(const c10::IValue& a, const c10::IValue& b) {
  if (a.isTensor() && b.isTensor())
    return a.toTensor().sizes() == b.toTensor().sizes() && at::equal(a.toTensor(), b.toTensor());
  if (a.isList() && b.isList()) {
    const auto la = a.toListRef(), lb = b.toListRef();
    if (la.size() != lb.size()) return false;
    for (size_t i = 0; i < la.size(); ++i)
      if (!same(la[i], lb[i])) return false;
    return true;
  }
  return a == b;
}

// "blocks.3.attn" from the module calls that inlining recorded, or the traced scope.
std::string module_of(Node* n) {
  std::string path;
  if (auto cs = n->callstack())
    for (const auto& entry : (*cs)->vec())
      if (const auto& info = std::get<torch::jit::kModuleInstanceInfo>(entry))
        if (!info->instance_name().empty()) path += (path.empty() ? "" : ".") + info->instance_name();
  if (path.empty() && n->scope() && !n->scope()->isBlank()) path = n->scope()->namesFromRoot();
  return path.empty() ? "the model's forward" : path;
}

class Converter {
 public:
  explicit Converter(onnx::Model& model) : model_(model) {}

  void run(Block* block) {
    for (Node* n : block->nodes()) step(n);
  }
  Val& at(const Value* v) { return env_.at(v); }
  void bind(const Value* v, Val val) { env_[v] = std::move(val); }

 private:
  // ---- ONNX emission
  std::string fresh(const std::string& hint) {
    std::string base;
    for (const char c : hint) base += std::isalnum(static_cast<unsigned char>(c)) ? c : '_';
    return (base.empty() ? "v" : base) + "_" + std::to_string(counter_++);
  }
  std::vector<std::string> emit_n(const std::string& op, std::vector<std::string> inputs, size_t outputs,
                                  std::vector<Attribute> attributes = {}) {
    onnx::Node n;
    n.op_type = op;
    n.inputs = std::move(inputs);
    for (size_t i = 0; i < outputs; ++i) n.outputs.push_back(fresh(op));
    n.attributes = std::move(attributes);
    model_.nodes.push_back(n);
    return n.outputs;
  }
  std::string emit(const std::string& op, std::vector<std::string> inputs, std::vector<Attribute> attributes = {}) {
    return emit_n(op, std::move(inputs), 1, std::move(attributes)).front();
  }
  std::string initializer(const at::Tensor& t, const std::string& hint = "const") {
    const std::string name = fresh(hint);
    model_.initializers.emplace_back(name, t.detach().to(at::kCPU).contiguous());
    return name;
  }
  std::string int64s(const std::vector<int64_t>& v) { return initializer(at::tensor(v, at::kLong), "ints"); }
  std::string cast(const std::string& name, at::ScalarType to) {
    return emit("Cast", {name}, {Attribute::integer("to", static_cast<int64_t>(onnx::data_type_of(at::empty({0}, to))))});
  }

  // ---- operands
  // A value as an ONNX input: its run-time name, or its constant as an initializer (scalars as 0-d tensors of
  // `scalar_type`). Run-time values of another type than `scalar_type` are cast when `cast_to_type`.
  std::string operand(const Value* v, at::ScalarType scalar_type, bool cast_to_type = true) {
    const Val& x = at(v);
    if (!x.name.empty()) {
      const at::ScalarType have = x.a.isTensor() ? x.a.toTensor().scalar_type()
                                  : x.a.isDouble()  ? at::kDouble
                                                    : at::kLong;
      const at::ScalarType onnx_have = have == at::kDouble ? at::kFloat : have;
      return cast_to_type && onnx_have != scalar_type ? cast(x.name, scalar_type) : x.name;
    }
    if (x.a.isTensor()) {  // a weight: one initializer however often it is read (traced scalars: 0-d tensors)
      const at::Tensor t = x.a.toTensor();
      const at::ScalarType type = cast_to_type ? scalar_type : t.scalar_type() == at::kDouble ? at::kFloat : t.scalar_type();
      auto& name = constants_[{t.unsafeGetTensorImpl(), type}];
      if (name.empty()) name = initializer(t.to(type), "weight");
      return name;
    }
    if (x.a.isInt()) return initializer(at::scalar_tensor(x.a.toInt(), scalar_type));
    if (x.a.isDouble()) return initializer(at::scalar_tensor(x.a.toDouble(), scalar_type));
    if (x.a.isBool()) return initializer(at::scalar_tensor(x.a.toBool(), scalar_type));
    if (x.a.isIntList()) return int64s(x.a.toIntVector());
    fail_on(v->node(), "an operand of type " + x.a.tagKind());
  }
  std::string tensor(const Value* v) {
    const Val& x = at(v);
    const auto type = x.a.isTensor() ? x.a.toTensor().scalar_type() : at::kFloat;
    return operand(v, type == at::kDouble ? at::kFloat : type, false);
  }
  int64_t constant_int(const Value* v) {
    const Val& x = at(v);
    if (x.dynamic() || !x.a.isInt()) fail_on(v->node(), "an argument that changes with the batch size");
    return x.a.toInt();
  }
  std::vector<int64_t> constant_ints(const Value* v) {
    const Val& x = at(v);
    if (x.dynamic()) fail_on(v->node(), "an argument that changes with the batch size");
    return x.a.isInt() ? std::vector<int64_t>{x.a.toInt()} : x.a.toIntVector();
  }
  // The shape of the output whose example values are `a` and `b` as an ONNX input: fixed dimensions as they are; the
  // one that changes with the batch as -1 where that is allowed (Reshape), else as the batch times its size per image.
  std::string shape_of(const Node* n, const at::Tensor& a, const at::Tensor& b, bool minus_one_allowed) {
    std::vector<int64_t> dims = a.sizes().vec();
    std::vector<size_t> moving;
    for (size_t d = 0; d < dims.size(); ++d)
      if (a.size(static_cast<int64_t>(d)) != b.size(static_cast<int64_t>(d))) moving.push_back(d);
    if (moving.empty()) return int64s(dims);
    if (moving.size() == 1 && minus_one_allowed) {
      dims[moving[0]] = -1;
      return int64s(dims);
    }
    if (moving.size() == 1 && batch_.name.size()) {
      // The moving dimension is a multiple of the batch: batch * (a's size / kBatchA).
      const int64_t per_image = dims[moving[0]] / kBatchA;
      std::vector<std::string> parts;
      if (moving[0] > 0) parts.push_back(int64s(std::vector<int64_t>(dims.begin(), dims.begin() + moving[0])));
      parts.push_back(emit("Mul", {emit("Unsqueeze", {batch_.name, int64s({0})}), int64s({per_image})}));
      if (moving[0] + 1 < dims.size()) parts.push_back(int64s(std::vector<int64_t>(dims.begin() + moving[0] + 1, dims.end())));
      return emit("Concat", parts, {Attribute::integer("axis", 0)});
    }
    fail_on(n, "an output with several dimensions that change with the batch size");
  }

  [[noreturn]] void fail_on(const Node* n, const std::string& what) {
    const std::string where = !calls_.empty() && !calls_.back().empty() ? calls_.back() : module_of(const_cast<Node*>(n));
    throw InputError("ONNX export: " + std::string(n->kind().toQualString()) + " in " + where +
                     " has no ONNX mapping (" + what + ")");
  }

  // ---- execution
  void step(Node* n) {
    const std::string kind = n->kind().toQualString();
    if (kind == "prim::Constant") {
      const auto value = torch::jit::toIValue(n->output());
      bind(n->output(), {*value, *value, "", {}});
      return;
    }
    if (kind == "prim::If") return branch(n);
    if (kind == "prim::CallMethod" || kind == "prim::CallFunction") return call(n, kind == "prim::CallMethod");
    if (kind == "prim::GetAttr") {  // of a module: a submodule, a weight or a flag, fixed
      const Val& owner = at(n->input(0));
      if (owner.dynamic()) fail_on(n, "an attribute of a run-time object");
      const auto value = owner.a.toObject()->getAttr(n->s(c10::attr::name));
      if (value.isObject()) {
        const std::string& where = module_paths_[owner.a.toObject().get()];
        module_paths_[value.toObject().get()] = (where.empty() ? "" : where + ".") + n->s(c10::attr::name);
      }
      bind(n->output(), {value, value, "", {}});
      return;
    }
    if (kind == "prim::Loop") fail_on(n, "loops are not exported");
    execute(n);
    bool dynamic_input = false;
    for (const Value* in : n->inputs()) dynamic_input = dynamic_input || at(in).dynamic();
    // Constants in, constants out (bound by execute); so are numbers, flags and sizes the batch does not change.
    if (!dynamic_input || stays_constant(n)) return;
    convert(n, kind);
  }

  // Runs `n` on both runs' inputs; binds its outputs as constants for now.
  void execute(Node* n) {
    torch::jit::Stack sa, sb;
    for (const Value* in : n->inputs()) {
      sa.push_back(at(in).a);
      sb.push_back(at(in).b);
    }
    try {
      if (!run_structural(n, sa) || !run_structural(n, sb)) {
        auto op = n->getOperation();
        op(sa);
        op(sb);
      }
    } catch (const c10::Error& e) {
      fail_on(n, std::string("running it on an example batch failed: ") + e.what_without_backtrace());
    }
    for (size_t i = 0; i < n->outputs().size(); ++i) bind(n->outputs()[i], {sa[i], sb[i], "", {}});
  }

  // The interpreter's own instructions (lists, tuples), which have no operator to call: run on `stack`, false for
  // other nodes.
  static bool run_structural(const Node* n, torch::jit::Stack& stack) {
    const std::string kind = n->kind().toQualString();
    if (kind == "prim::ListConstruct") {
      const auto element = n->output()->type()->expectRef<c10::ListType>().getElementType();
      c10::impl::GenericList list(element);
      for (auto& v : stack) list.push_back(std::move(v));
      stack = {c10::IValue(std::move(list))};
    } else if (kind == "prim::ListUnpack") {
      const auto list = stack.at(0).toListRef().vec();
      stack = std::vector<c10::IValue>(list.begin(), list.end());
    } else if (kind == "prim::TupleConstruct") {
      stack = {c10::ivalue::Tuple::create(std::vector<c10::IValue>(stack.begin(), stack.end()))};
    } else if (kind == "prim::TupleUnpack") {
      const auto elements = stack.at(0).toTupleRef().elements().vec();
      stack = std::vector<c10::IValue>(elements.begin(), elements.end());
    } else if (kind == "prim::TupleIndex") {
      const auto& elements = stack.at(0).toTupleRef().elements();
      int64_t i = stack.at(1).toInt();
      if (i < 0) i += static_cast<int64_t>(elements.size());
      stack = {elements.at(static_cast<size_t>(i))};
    } else if (kind == "aten::format") {  // messages of asserts that do not fire: not needed
      stack = {c10::IValue(std::string())};
    } else if (kind == "prim::Uninitialized") {
      stack = {c10::IValue()};
    } else if (kind == "prim::unchecked_cast") {
      stack.resize(1);
    } else {
      return false;
    }
    return true;
  }

  // A method or function call, run inside its own graph (the callee's values are bound anew at each call).
  void call(Node* n, bool method) {
    torch::jit::Function* function = nullptr;
    std::string where;
    if (method) {
      const auto object = at(n->input(0)).a.toObject();
      function = &object->type()->getMethod(n->s(c10::attr::name));
      where = module_paths_[object.get()];
    } else {
      function = n->input(0)->type()->expect<c10::FunctionType>()->function();
    }
    const auto graph = torch::jit::toGraphFunction(*function).graph();
    const size_t first = method ? 0 : 1;  // a function's first input is the function itself
    for (size_t i = first; i < n->inputs().size(); ++i) bind(graph->inputs()[i - first], at(n->input(i)));
    calls_.push_back(where);
    run(graph->block());
    calls_.pop_back();
    for (size_t i = 0; i < n->outputs().size(); ++i) bind(n->outputs()[i], at(graph->outputs()[i]));
  }

  void branch(Node* n) {
    const Val& cond = at(n->input(0));
    if (cond.dynamic() || cond.a.toBool() != cond.b.toBool()) fail_on(n, "a branch that depends on the batch size");
    Block* taken = n->blocks()[cond.a.toBool() ? 0 : 1];
    run(taken);
    for (size_t i = 0; i < n->outputs().size(); ++i) bind(n->outputs()[i], at(taken->outputs()[i]));
  }

  // Output `i` of `n` becomes the run-time value `name`.
  void produce(const Node* n, const std::string& name, size_t i = 0) { env_[n->outputs()[i]].name = name; }

  // In-place operators (relu_, add_) as their plain forms; later reads of the input see the result.
  void convert(Node* n, const std::string& kind) {
    const bool in_place = kind.size() > 1 && kind.back() == '_' && kind[kind.size() - 2] != '_';
    const auto handler = handlers().find(in_place ? kind.substr(0, kind.size() - 1) : kind);
    if (handler == handlers().end()) fail_on(n, "an operator the exporter does not map");
    (this->*handler->second)(n);
    if (in_place) {
      env_[n->input(0)].name = env_[n->output()].name;
      env_[n->input(0)].names = env_[n->output()].names;
    }
  }

  using Handler = void (Converter::*)(Node*);
  static const std::unordered_map<std::string, Handler>& handlers();

  // Non-tensor outputs that did not change with the batch stay constants even from run-time inputs.
  bool stays_constant(const Node* n) const {
    for (const Value* out : n->outputs()) {
      const Val& v = env_.at(out);
      if (v.a.isTensor() || v.a.isTensorList() || v.a.isTuple() || !same(v.a, v.b)) return false;
    }
    return true;
  }
  at::Tensor ta(const Node* n, size_t i = 0) { return at(n->outputs()[i]).a.toTensor(); }
  at::Tensor tb(const Node* n, size_t i = 0) { return at(n->outputs()[i]).b.toTensor(); }
  at::ScalarType out_type(const Node* n) {
    const Val& v = at(n->output());
    if (v.a.isTensor()) return v.a.toTensor().scalar_type() == at::kDouble ? at::kFloat : v.a.toTensor().scalar_type();
    return v.a.isDouble() ? at::kFloat : at::kLong;
  }

  // ---- operators
  void binary(Node* n, const char* op) {
    const at::ScalarType type = out_type(n);
    if (n->inputs().size() > 2 && n->input(2)->type()->kind() != c10::TypeKind::NoneType &&
        n->kind() != c10::Symbol::fromQualString("aten::div")) {
      const Val& alpha = at(n->input(2));
      if (alpha.dynamic() || !(alpha.a.isInt() ? alpha.a.toInt() == 1 : alpha.a.toDouble() == 1.0))
        fail_on(n, "alpha other than 1");
    }
    if (n->kind() == c10::Symbol::fromQualString("aten::div") && n->inputs().size() > 2 &&
        !at(n->input(2)).a.isNone())
      fail_on(n, "a rounding mode");
    produce(n, emit(op, {operand(n->input(0), type), operand(n->input(1), type)}));
  }
  void add(Node* n) { binary(n, "Add"); }
  void sub(Node* n) { binary(n, "Sub"); }
  void mul(Node* n) { binary(n, "Mul"); }
  void div(Node* n) {
    if (out_type(n) == at::kLong) fail_on(n, "integer division");
    binary(n, "Div");
  }
  void floor_divide(Node* n) {  // sizes: non-negative integers, where ONNX's truncating Div is the floor
    if (out_type(n) != at::kLong) fail_on(n, "a floor division of non-integers");
    produce(n, emit("Div", {operand(n->input(0), at::kLong), operand(n->input(1), at::kLong)}));
  }
  void matmul(Node* n) { produce(n, emit("MatMul", {tensor(n->input(0)), tensor(n->input(1))})); }
  void unary(Node* n, const char* op) { produce(n, emit(op, {tensor(n->input(0))})); }
  void sigmoid(Node* n) { unary(n, "Sigmoid"); }
  void tanh(Node* n) { unary(n, "Tanh"); }
  void relu(Node* n) { unary(n, "Relu"); }
  void neg(Node* n) { unary(n, "Neg"); }
  void silu(Node* n) {
    const std::string x = tensor(n->input(0));
    produce(n, emit("Mul", {x, emit("Sigmoid", {x})}));
  }
  void identity(Node* n) {
    const Val& x = at(n->input(0));
    env_[n->output()].name = x.name;
    env_[n->output()].names = x.names;
  }
  void to_type(Node* n) {  // aten::to(x, dtype, ...) and the like: a cast where the dtype changes
    if (!ta(n).defined()) fail_on(n, "a conversion to a non-tensor");
    const at::ScalarType from = at(n->input(0)).a.toTensor().scalar_type(), to = ta(n).scalar_type();
    produce(n, from == to ? tensor(n->input(0)) : cast(tensor(n->input(0)), to));
  }
  void number_to_tensor(Node* n) {  // prim::NumToTensor, aten::Int, aten::Float, aten::ScalarImplicit
    produce(n, operand(n->input(0), out_type(n)));
  }
  void softmax(Node* n) {
    const int64_t rank = ta(n).dim();
    int64_t axis = constant_int(n->input(1));
    if (axis < 0) axis += rank;
    produce(n, emit("Softmax", {tensor(n->input(0))}, {Attribute::integer("axis", axis)}));
  }
  void gelu(Node* n) {
    const std::string x = tensor(n->input(0));
    const bool tanh_approximation = n->inputs().size() > 1 && at(n->input(1)).a.isString() &&
                                    at(n->input(1)).a.toStringRef() == "tanh";
    auto scalar = [&](double v) { return initializer(at::scalar_tensor(v, at::kFloat)); };
    std::string inner;
    if (tanh_approximation) {
      // 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
      const std::string cube = emit("Mul", {emit("Mul", {x, x}), x});
      const std::string sum = emit("Add", {x, emit("Mul", {cube, scalar(0.044715)})});
      inner = emit("Tanh", {emit("Mul", {sum, scalar(std::sqrt(2.0 / kPi))})});
    } else {
      inner = emit("Erf", {emit("Div", {x, scalar(std::sqrt(2.0))})});  // 0.5 x (1 + erf(x / sqrt(2)))
    }
    produce(n, emit("Mul", {emit("Mul", {x, scalar(0.5)}), emit("Add", {inner, scalar(1.0)})}));
  }
  void layer_norm(Node* n) {
    const auto shape = constant_ints(n->input(1));
    const Val& w = at(n->input(2));
    const Val& b = at(n->input(3));
    if (w.dynamic() || b.dynamic()) fail_on(n, "a run-time scale");
    const at::Tensor scale = w.a.isNone() ? at::ones(shape, at::kFloat) : w.a.toTensor().to(at::kFloat);
    const at::Tensor bias = b.a.isNone() ? at::zeros(shape, at::kFloat) : b.a.toTensor().to(at::kFloat);
    produce(n, emit("LayerNormalization", {tensor(n->input(0)), initializer(scale, "ln_scale"), initializer(bias, "ln_bias")},
                    {Attribute::integer("axis", -static_cast<int64_t>(shape.size())),
                     Attribute::real("epsilon", at(n->input(4)).a.toDouble())}));
  }
  void linear(Node* n) {
    // W^T by a Transpose of the weight as stored (ONNX Runtime folds it when it loads the file): no copy here.
    const std::string weight = emit("Transpose", {tensor(n->input(1))}, {Attribute::integers("perm", {1, 0})});
    std::string y = emit("MatMul", {tensor(n->input(0)), weight});
    if (n->inputs().size() > 2 && !at(n->input(2)).a.isNone()) y = emit("Add", {y, tensor(n->input(2))});
    produce(n, y);
  }
  void convolution(Node* n) {  // aten::conv2d(x, w, b, stride, padding, dilation, groups); _convolution adds more
    const bool full = n->kind() == c10::Symbol::fromQualString("aten::_convolution");
    if (full && at(n->input(6)).a.toBool()) fail_on(n, "transposed convolution");
    const auto stride = constant_ints(n->input(3));
    const Val& pad = at(n->input(4));
    if (pad.a.isString()) fail_on(n, "string padding");
    auto padding = constant_ints(n->input(4));
    const auto dilation = constant_ints(n->input(5));
    const int64_t groups = constant_int(n->input(full ? 8 : 6));
    const int64_t spatial = ta(n).dim() - 2;
    auto expand = [&](std::vector<int64_t> v) {
      if (v.size() == 1) v.assign(static_cast<size_t>(spatial), v[0]);
      return v;
    };
    padding = expand(padding);
    std::vector<int64_t> pads = padding;
    pads.insert(pads.end(), padding.begin(), padding.end());
    std::vector<std::string> inputs = {tensor(n->input(0)), tensor(n->input(1))};
    if (!at(n->input(2)).a.isNone()) inputs.push_back(tensor(n->input(2)));
    produce(n, emit("Conv", inputs,
                    {Attribute::integers("strides", expand(stride)), Attribute::integers("pads", pads),
                     Attribute::integers("dilations", expand(dilation)), Attribute::integer("group", groups)}));
  }
  void reshape(Node* n) {  // flatten, view, reshape, unflatten, squeeze: to the output's shape
    produce(n, emit("Reshape", {tensor(n->input(0)), shape_of(n, ta(n), tb(n), true)}));
  }
  void expand(Node* n) {
    produce(n, emit("Expand", {tensor(n->input(0)), shape_of(n, ta(n), tb(n), false)}));
  }
  void transpose(Node* n) {
    const int64_t rank = ta(n).dim();
    std::vector<int64_t> perm(static_cast<size_t>(rank));
    for (int64_t i = 0; i < rank; ++i) perm[static_cast<size_t>(i)] = i;
    int64_t d0 = constant_int(n->input(1)), d1 = constant_int(n->input(2));
    if (d0 < 0) d0 += rank;
    if (d1 < 0) d1 += rank;
    std::swap(perm[static_cast<size_t>(d0)], perm[static_cast<size_t>(d1)]);
    produce(n, emit("Transpose", {tensor(n->input(0))}, {Attribute::integers("perm", perm)}));
  }
  void permute(Node* n) {
    auto perm = constant_ints(n->input(1));
    for (auto& p : perm)
      if (p < 0) p += static_cast<int64_t>(perm.size());
    produce(n, emit("Transpose", {tensor(n->input(0))}, {Attribute::integers("perm", perm)}));
  }
  int64_t dim_arg(const Node* n, size_t input, int64_t rank) {
    int64_t d = constant_int(n->input(input));
    return d < 0 ? d + rank : d;
  }
  void select(Node* n) {
    const int64_t rank = at(n->input(0)).a.toTensor().dim();
    produce(n, emit("Gather", {tensor(n->input(0)), initializer(at::scalar_tensor(constant_int(n->input(2)), at::kLong))},
                    {Attribute::integer("axis", dim_arg(n, 1, rank))}));
  }
  void slice(Node* n) {
    const int64_t rank = at(n->input(0)).a.toTensor().dim();
    const Val& start = at(n->input(2));
    const Val& end = at(n->input(3));
    const int64_t s = start.a.isNone() ? 0 : constant_int(n->input(2));
    const int64_t e = end.a.isNone() ? std::numeric_limits<int64_t>::max() : constant_int(n->input(3));
    produce(n, emit("Slice", {tensor(n->input(0)), int64s({s}), int64s({e}), int64s({dim_arg(n, 1, rank)}),
                              int64s({constant_int(n->input(4))})}));
  }
  void split_into(Node* n, int64_t axis, const std::vector<int64_t>& sizes, bool squeeze) {
    auto parts = emit_n("Split", {tensor(n->input(0)), int64s(sizes)}, sizes.size(), {Attribute::integer("axis", axis)});
    if (squeeze)
      for (auto& p : parts) p = emit("Squeeze", {p, int64s({axis})});
    env_[n->output()].names = parts;
  }
  void unbind(Node* n) {
    const at::Tensor x = at(n->input(0)).a.toTensor();
    const int64_t axis = dim_arg(n, 1, x.dim());
    split_into(n, axis, std::vector<int64_t>(static_cast<size_t>(x.size(axis)), 1), true);
  }
  void chunk(Node* n) {
    const at::Tensor x = at(n->input(0)).a.toTensor();
    const int64_t axis = dim_arg(n, 2, x.dim());
    std::vector<int64_t> sizes;
    for (const auto& part : at(n->output()).a.toTensorVector()) sizes.push_back(part.size(axis));
    split_into(n, axis, sizes, false);
  }
  void cat(Node* n) {
    const Val& list = at(n->input(0));
    const int64_t axis = dim_arg(n, 1, ta(n).dim());
    std::vector<std::string> inputs = list.names;
    produce(n, emit("Concat", inputs, {Attribute::integer("axis", axis)}));
  }
  void mean(Node* n) {
    const int64_t rank = at(n->input(0)).a.toTensor().dim();
    auto axes = constant_ints(n->input(1));
    for (auto& a : axes)
      if (a < 0) a += rank;
    produce(n, emit("ReduceMean", {tensor(n->input(0))},
                    {Attribute::integers("axes", axes), Attribute::integer("keepdims", at(n->input(2)).a.toBool())}));
  }
  void size(Node* n) {  // of a run-time tensor: fixed dimensions stay constants
    const std::string shape = emit("Shape", {tensor(n->input(0))});
    if (n->inputs().size() == 1) return produce(n, shape);
    const int64_t rank = at(n->input(0)).a.toTensor().dim();
    produce(n, emit("Gather", {shape, initializer(at::scalar_tensor(dim_arg(n, 1, rank), at::kLong))}, {Attribute::integer("axis", 0)}));
  }
  void list_construct(Node* n) {
    std::vector<std::string> elements;
    for (const Value* in : n->inputs()) elements.push_back(at(in).a.isTensor() ? tensor(in) : operand(in, at::kLong));
    const bool of_tensors = std::any_of(n->inputs().begin(), n->inputs().end(), [&](const Value* in) { return at(in).a.isTensor(); });
    if (of_tensors) {
      env_[n->output()].names = elements;
      return;
    }
    for (auto& e : elements) e = emit("Unsqueeze", {e, int64s({0})});  // integers: a 1-D int64 tensor
    produce(n, emit("Concat", elements, {Attribute::integer("axis", 0)}));
  }
  void list_unpack(Node* n) {
    const Val& list = at(n->input(0));
    for (size_t i = 0; i < n->outputs().size(); ++i) {
      if (!list.names.empty()) produce(n, list.names.at(i), i);
      else if (!list.name.empty())
        produce(n, emit("Gather", {list.name, initializer(at::scalar_tensor(static_cast<int64_t>(i), at::kLong))},
                        {Attribute::integer("axis", 0)}), i);
    }
  }
  void batch_norm(Node* n) {  // (x, weight, bias, running_mean, running_var, training, momentum, eps, cudnn)
    if (at(n->input(5)).a.toBool()) fail_on(n, "batch statistics (training mode)");
    const at::Tensor mean = at(n->input(3)).a.toTensor();
    auto or_default = [&](size_t i, double fill) {
      return at(n->input(i)).a.isNone() ? initializer(at::full_like(mean, fill)) : tensor(n->input(i));
    };
    produce(n, emit("BatchNormalization", {tensor(n->input(0)), or_default(1, 1.0), or_default(2, 0.0),
                                           tensor(n->input(3)), tensor(n->input(4))},
                    {Attribute::real("epsilon", at(n->input(7)).a.toDouble())}));
  }
  void embedding(Node* n) {  // (weight, indices, ...): rows of the table
    produce(n, emit("Gather", {tensor(n->input(0)), tensor(n->input(1))}, {Attribute::integer("axis", 0)}));
  }
  void argmax(Node* n) {
    const at::Tensor x = at(n->input(0)).a.toTensor();
    if (at(n->input(1)).a.isNone()) fail_on(n, "an argmax over all elements");
    produce(n, emit("ArgMax", {tensor(n->input(0))},
                    {Attribute::integer("axis", dim_arg(n, 1, x.dim())),
                     Attribute::integer("keepdims", at(n->input(2)).a.toBool())}));
  }
  void arange(Node* n) {  // arange(end, ...), arange(start, end, ...), arange(start, end, step, ...)
    const size_t count = n->inputs().size();
    const at::ScalarType type = ta(n).scalar_type();
    std::string start, end, step;
    if (count == 5) {
      start = initializer(at::scalar_tensor(0, type)), end = operand(n->input(0), type);
      step = initializer(at::scalar_tensor(1, type));
    } else {
      start = operand(n->input(0), type), end = operand(n->input(1), type);
      step = count == 7 ? operand(n->input(2), type) : initializer(at::scalar_tensor(1, type));
    }
    produce(n, emit("Range", {start, end, step}));
  }
  void index(Node* n) {  // x[i0, i1, ...] with 1-D index tensors of one length on the leading dimensions
    const auto indices = at(n->input(1)).a.toListRef();
    std::vector<std::string> columns;
    for (size_t k = 0; k < indices.size(); ++k) {
      if (indices[k].isNone() || indices[k].toTensor().dim() != 1) fail_on(n, "indices other than 1-D tensors");
      const std::string& name = at(n->input(1)).names.empty() ? "" : at(n->input(1)).names[k];
      const std::string column = name.empty() ? initializer(indices[k].toTensor()) : name;
      columns.push_back(emit("Unsqueeze", {column, int64s({1})}));
    }
    produce(n, emit("GatherND", {tensor(n->input(0)), emit("Concat", columns, {Attribute::integer("axis", 1)})}));
  }
  void unsqueeze(Node* n) {
    int64_t d = constant_int(n->input(1));
    if (d < 0) d += ta(n).dim();
    produce(n, emit("Unsqueeze", {tensor(n->input(0)), int64s({d})}));
  }
  void avg_pool(Node* n) {  // adaptive to 1x1, or avg_pool2d(x, kernel, stride, padding, ceil_mode, count_include_pad)
    const bool adaptive = n->kind() == c10::Symbol::fromQualString("aten::adaptive_avg_pool2d");
    if (adaptive) {
      if (constant_ints(n->input(1)) != std::vector<int64_t>{1, 1}) fail_on(n, "an adaptive output other than 1x1");
      return produce(n, emit("GlobalAveragePool", {tensor(n->input(0))}));
    }
    auto pair = [&](std::vector<int64_t> v) { return v.size() == 1 ? std::vector<int64_t>{v[0], v[0]} : v; };
    const auto kernel = pair(constant_ints(n->input(1)));
    auto stride = constant_ints(n->input(2));
    stride = stride.empty() ? kernel : pair(stride);
    const auto padding = pair(constant_ints(n->input(3)));
    if (n->inputs().size() > 6 && !at(n->input(6)).a.isNone()) fail_on(n, "a divisor override");
    produce(n, emit("AveragePool", {tensor(n->input(0))},
                    {Attribute::integers("kernel_shape", kernel), Attribute::integers("strides", stride),
                     Attribute::integers("pads", {padding[0], padding[1], padding[0], padding[1]}),
                     Attribute::integer("ceil_mode", at(n->input(4)).a.toBool()),
                     Attribute::integer("count_include_pad", at(n->input(5)).a.toBool())}));
  }
  void hardswish(Node* n) { unary(n, "HardSwish"); }
  void hardsigmoid(Node* n) {  // relu6(x + 3) / 6
    produce(n, emit("HardSigmoid", {tensor(n->input(0))}, {Attribute::real("alpha", 1.0 / 6), Attribute::real("beta", 0.5)}));
  }
  void erf(Node* n) { unary(n, "Erf"); }
  void sqrt(Node* n) { unary(n, "Sqrt"); }
  void exp(Node* n) { unary(n, "Exp"); }
  void tuple_construct(Node* n) {  // elements: run-time tensors by name, constants as "" (their values in a)
    auto& names = env_[n->output()].names;
    names.clear();
    for (const Value* in : n->inputs()) names.push_back(at(in).name);
  }
  void tuple_index(Node* n) {
    const Val& tuple = at(n->input(0));
    const int64_t i = constant_int(n->input(1));
    const std::string& name = tuple.names.at(static_cast<size_t>(i));
    if (!name.empty()) produce(n, name);
  }
  void tuple_unpack(Node* n) {
    const Val& tuple = at(n->input(0));
    for (size_t i = 0; i < n->outputs().size(); ++i)
      if (!tuple.names.at(i).empty()) produce(n, tuple.names[i], i);
  }
  void get_item(Node* n) {
    const Val& list = at(n->input(0));
    const int64_t i = constant_int(n->input(1));
    if (!list.names.empty()) return produce(n, list.names.at(static_cast<size_t>(i < 0 ? i + static_cast<int64_t>(list.names.size()) : i)));
    produce(n, emit("Gather", {list.name, initializer(at::scalar_tensor(i, at::kLong))}, {Attribute::integer("axis", 0)}));
  }

  onnx::Model& model_;
  std::unordered_map<const Value*, Val> env_;
  std::map<std::pair<const c10::TensorImpl*, at::ScalarType>, std::string> constants_;  // constant -> initializer
  std::unordered_map<const c10::ivalue::Object*, std::string> module_paths_;  // submodule -> "blocks.3.attn"
  std::vector<std::string> calls_;  // the modules whose code runs, innermost last
  int64_t counter_ = 0;
  Val batch_;  // the batch size as a run-time int64 scalar (set by the caller)

  friend OnnxExportReport loratune::export_onnx(const Bundle&, const std::filesystem::path&, const OnnxExportOptions&);
};

const std::unordered_map<std::string, Converter::Handler>& Converter::handlers() {
  static const std::unordered_map<std::string, Handler> table = {
      {"aten::add", &Converter::add},
      {"aten::sub", &Converter::sub},
      {"aten::mul", &Converter::mul},
      {"aten::div", &Converter::div},
      {"aten::floordiv", &Converter::floor_divide},
      {"aten::floor_divide", &Converter::floor_divide},
      {"aten::matmul", &Converter::matmul},
      {"aten::bmm", &Converter::matmul},
      {"aten::sigmoid", &Converter::sigmoid},
      {"aten::tanh", &Converter::tanh},
      {"aten::relu", &Converter::relu},
      {"aten::neg", &Converter::neg},
      {"aten::silu", &Converter::silu},
      {"aten::gelu", &Converter::gelu},
      {"aten::softmax", &Converter::softmax},
      {"aten::layer_norm", &Converter::layer_norm},
      {"aten::linear", &Converter::linear},
      {"aten::conv2d", &Converter::convolution},
      {"aten::_convolution", &Converter::convolution},
      {"aten::flatten", &Converter::reshape},
      {"aten::view", &Converter::reshape},
      {"aten::reshape", &Converter::reshape},
      {"aten::unflatten", &Converter::reshape},
      {"aten::squeeze", &Converter::reshape},  // the batch axis (2 or 5 in the examples) is never squeezed
      {"aten::expand", &Converter::expand},
      {"aten::transpose", &Converter::transpose},
      {"aten::permute", &Converter::permute},
      {"aten::select", &Converter::select},
      {"aten::slice", &Converter::slice},
      {"aten::unbind", &Converter::unbind},
      {"aten::chunk", &Converter::chunk},
      {"aten::cat", &Converter::cat},
      {"aten::mean", &Converter::mean},
      {"aten::size", &Converter::size},
      {"aten::contiguous", &Converter::identity},
      {"aten::dropout", &Converter::identity},
      {"aten::detach", &Converter::identity},
      {"aten::clone", &Converter::identity},
      {"aten::to", &Converter::to_type},
      {"prim::NumToTensor", &Converter::number_to_tensor},
      {"aten::Int", &Converter::number_to_tensor},
      {"aten::Float", &Converter::number_to_tensor},
      {"aten::ScalarImplicit", &Converter::number_to_tensor},
      {"prim::ListConstruct", &Converter::list_construct},
      {"prim::ListUnpack", &Converter::list_unpack},
      {"aten::__getitem__", &Converter::get_item},
      {"prim::TupleConstruct", &Converter::tuple_construct},
      {"prim::TupleIndex", &Converter::tuple_index},
      {"prim::TupleUnpack", &Converter::tuple_unpack},
      {"prim::unchecked_cast", &Converter::identity},
      {"aten::batch_norm", &Converter::batch_norm},
      {"aten::embedding", &Converter::embedding},
      {"aten::argmax", &Converter::argmax},
      {"aten::arange", &Converter::arange},
      {"aten::index", &Converter::index},
      {"aten::unsqueeze", &Converter::unsqueeze},
      {"aten::avg_pool2d", &Converter::avg_pool},
      {"aten::adaptive_avg_pool2d", &Converter::avg_pool},
      {"aten::hardswish", &Converter::hardswish},
      {"aten::hardsigmoid", &Converter::hardsigmoid},
      {"aten::erf", &Converter::erf},
      {"aten::sqrt", &Converter::sqrt},
      {"aten::exp", &Converter::exp},
  };
  return table;
}

// What the graph takes: its input's name, type and shape, and the two example batches it runs on.
struct GraphInput {
  std::string name;
  onnx::DataType type = onnx::DataType::kFloat;
  std::vector<std::pair<int64_t, std::string>> dims;
  at::Tensor a, b;
};

GraphInput graph_input(const Bundle& bundle) {
  torch::manual_seed(0);
  if (bundle.info.kind == "text_encoder") {
    // Token rows as the tokenizer writes them: start, some words, end (the largest id: pooling finds it), padding.
    // Without start and end tokens (SigLIP pools the last position), ids below 3, which every vocabulary has.
    const int64_t context = bundle.info.extra.value("context_length", int64_t{77});
    const int64_t sot = bundle.info.extra.value("sot", int64_t{0}), eot = bundle.info.extra.value("eot", int64_t{0});
    if (context < 3) throw InputError("ONNX export: " + bundle.path.string() + " has a context length under 3");
    auto tokens = [&](int64_t rows) {
      if (eot <= 1) return at::randint(0, 3, {rows, context}, at::kLong);
      at::Tensor t = at::zeros({rows, context}, at::kLong);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t words = 1 + (r * 7) % std::max<int64_t>(1, context - 2);
        t[r][0] = sot;
        t[r].narrow(0, 1, words).copy_(at::randint(1, eot, {words}, at::kLong));
        t[r][words + 1] = eot;
      }
      return t;
    };
    return {"tokens", onnx::DataType::kInt64, {{0, "batch"}, {context, ""}}, tokens(kBatchA), tokens(kBatchB)};
  }
  const int64_t s = bundle.info.image_size;
  return {"images", onnx::DataType::kFloat, {{0, "batch"}, {3, ""}, {s, ""}, {s, ""}},
          at::randn({kBatchA, 3, s, s}).requires_grad_(true), at::randn({kBatchB, 3, s, s}).requires_grad_(true)};
}

// Float tensors and computation in float16: casts to float made casts to float16, float initializers converted,
// the float input cast once on the way in (`input`, empty for token ids) and the result cast back to float on the
// way out. BatchNormalization stays float32 between two casts: ONNX Runtime's CPU kernels take no float16 statistics.
void to_float16(onnx::Model& model, const std::string& input, const std::string& result) {
  const auto cast = [](const std::string& from, const std::string& to, onnx::DataType type) {
    return onnx::Node{"Cast", {from}, {to}, {Attribute::integer("to", static_cast<int64_t>(type))}, ""};
  };
  std::set<std::string> kept;  // initializers that stay float32
  std::vector<onnx::Node> nodes;
  for (auto& node : model.nodes) {
    if (node.op_type == "Cast")
      for (auto& a : node.attributes)
        if (a.name == "to" && a.i == static_cast<int64_t>(onnx::DataType::kFloat))
          a.i = static_cast<int64_t>(onnx::DataType::kFloat16);
    if (node.op_type != "BatchNormalization") {
      nodes.push_back(std::move(node));
      continue;
    }
    kept.insert(node.inputs.begin() + 1, node.inputs.end());
    const std::string x = node.inputs[0], y = node.outputs[0];
    nodes.push_back(cast(x, x + "_fp32", onnx::DataType::kFloat));
    node.inputs[0] = x + "_fp32";
    node.outputs[0] = y + "_fp32";
    nodes.push_back(std::move(node));
    nodes.push_back(cast(y + "_fp32", y, onnx::DataType::kFloat16));
  }
  model.nodes = std::move(nodes);
  for (auto& [name, t] : model.initializers)
    if (t.scalar_type() == at::kFloat && kept.count(name) == 0) t = t.to(at::kHalf);
  if (!input.empty()) {
    const std::string half = input + "_fp16";
    for (auto& node : model.nodes)
      for (auto& i : node.inputs)
        if (i == input) i = half;
    model.nodes.insert(model.nodes.begin(), cast(input, half, onnx::DataType::kFloat16));
  }
  onnx::Node& last = model.nodes.back();  // Identity(out -> result)
  last = cast(last.inputs.front(), result, onnx::DataType::kFloat);
}

std::string output_name(const BundleInfo& info) {
  return info.kind == "classifier" ? "logits" : info.kind == "text_encoder" ? "embeddings" : "features";
}

std::vector<std::pair<std::string, std::string>> metadata(const BundleInfo& info) {
  std::vector<std::pair<std::string, std::string>> m = {{"loratune.kind", info.kind},
                                                        {"loratune.architecture", info.architecture},
                                                        {"loratune.family", info.family}};
  if (info.kind == "text_encoder") {
    for (const char* key : {"tokenizer", "context_length", "sot", "eot", "logit_scale"})
      if (info.extra.contains(key)) m.emplace_back(key, info.extra.at(key).dump());
    m.emplace_back("input_layout", "NL int64 token ids: start, tokens, end, zero padding");
    return m;
  }
  const std::vector<std::pair<std::string, std::string>> image = {
      {"image_size", std::to_string(info.image_size)},
      {"resize_size", std::to_string(info.resize_size)},
      {"interpolation", info.interpolation},
      {"mean", nlohmann::json(info.mean).dump()},
      {"std", nlohmann::json(info.std).dump()},
      {"classes", nlohmann::json(info.classes).dump()},
      {"input_layout", "NCHW float32 RGB: resize the short side to resize_size, center-crop image_size, scale to "
                       "[0, 1], then (x - mean) / std"}};
  m.insert(m.end(), image.begin(), image.end());
  return m;
}

}  // namespace

OnnxExportReport export_onnx(const Bundle& bundle, const std::filesystem::path& output, const OnnxExportOptions& options) {
  const std::string& kind = bundle.info.kind;
  if (kind != "backbone" && kind != "classifier" && kind != "text_encoder")
    throw InputError("ONNX export takes model bundles (backbone, classifier or text encoder); " +
                     bundle.path.string() + " is a " + kind);
  torch::jit::Module module = bundle.module;
  module.eval();
  const auto graph = module.get_method("forward").graph();
  if (graph->inputs().size() != 2)
    throw InputError("ONNX export: " + bundle.path.string() + "'s forward takes " +
                     std::to_string(graph->inputs().size() - 1) + " inputs, not one batch");

  onnx::Model model;
  model.graph_name = bundle.info.architecture.empty() ? "loratune" : bundle.info.architecture;
  model.opset = options.opset;
  model.producer_version = LORATUNE_VERSION;
  model.metadata = metadata(bundle.info);
  model.metadata.emplace_back("precision", options.fp16 ? "fp16" : "fp32");
  GraphInput in = graph_input(bundle);
  model.inputs.push_back({in.name, in.type, in.dims});

  Converter c(model);
  at::AutoGradMode grad(true);  // the code paths training takes (no inference-only fused kernels)
  c.bind(graph->inputs()[0], {module._ivalue(), module._ivalue(), "", {}});
  c.bind(graph->inputs()[1], {in.a, in.b, in.name, {}});
  c.batch_ = {kBatchA, kBatchB, c.emit("Gather", {c.emit("Shape", {in.name}), c.initializer(at::scalar_tensor(0, at::kLong))},
                                       {Attribute::integer("axis", 0)}), {}};
  c.run(graph->block());

  const Val& out = c.at(graph->outputs()[0]);
  if (out.name.empty() || !out.a.isTensor())
    throw InputError("ONNX export: " + bundle.path.string() + "'s forward does not return a tensor computed from its input");
  const std::string result = output_name(bundle.info);
  model.nodes.push_back({"Identity", {out.name}, {result}, {}, ""});
  if (options.fp16) to_float16(model, in.type == onnx::DataType::kFloat ? in.name : "", result);
  std::vector<std::pair<int64_t, std::string>> dims = {{0, "batch"}};
  for (int64_t d = 1; d < out.a.toTensor().dim(); ++d) dims.push_back({out.a.toTensor().size(d), ""});
  model.outputs.push_back({result, onnx::DataType::kFloat, dims});

  const std::filesystem::path data_file =
      options.external_data ? output.parent_path() / (output.filename().string() + ".data") : std::filesystem::path();
  onnx::write_model(model, output, data_file, options.external_data_threshold);
  std::error_code ec;
  const auto data_bytes = data_file.empty() ? 0 : std::filesystem::file_size(data_file, ec);
  return {static_cast<int64_t>(model.nodes.size()), static_cast<int64_t>(model.initializers.size()),
          static_cast<int64_t>(std::filesystem::file_size(output) + (ec ? 0 : data_bytes)), in.name, result};
}

}  // namespace loratune
