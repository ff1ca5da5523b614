#include "loratune/mlp_adapters.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/jit/ir/ir.h>

#include <cmath>
#include <set>

#include "common/torch_compat.h"
#include "loratune/errors.h"
#include "loratune/prompt_tokens.h"

namespace loratune {
namespace {

using torch::jit::Node;
using torch::jit::Value;

// Module attributes the rewritten blocks read: the tensors (adaptformer_tensor_names(), "." as "_") and the scale.
const std::vector<std::string>& attribute_names() {
  static const std::vector<std::string> names = {"adaptformer_down_weight", "adaptformer_down_bias",
                                                 "adaptformer_up_weight", "adaptformer_up_bias"};
  return names;
}
constexpr const char* kScale = "adaptformer_scale";

// Written without branches, so that a merged file exports to ONNX as it is; scale 0 turns it off.
constexpr const char* kForwardCode = R"(
def adaptformer_forward(self, x: Tensor, y: Tensor) -> Tensor:
    h = torch.relu(torch.linear(x, self.adaptformer_down_weight.to(x.dtype), self.adaptformer_down_bias.to(x.dtype)))
    return y + torch.linear(h, self.adaptformer_up_weight.to(x.dtype), self.adaptformer_up_bias.to(x.dtype)) * self.adaptformer_scale
)";

// The child of the graph's own module under which `n` calls a module's forward (`self.mlp(x)` and
// `self.mlp.c_fc(x)`, as loratune's own imports write blocks, both give "mlp"), or "".
std::string called_child(const Node* n, const Value* self) {
  if (n->kind() != c10::prim::CallMethod || n->s(c10::attr::name) != "forward") return "";
  const Node* get = n->input(0)->node();
  while (get->kind() == c10::prim::GetAttr && get->input(0) != self) get = get->input(0)->node();
  return get->kind() == c10::prim::GetAttr ? get->s(c10::attr::name) : "";
}

// The block type's forward: after the MLP's call, y = self.adaptformer_forward(x', y), or (y, y) when `sequential`.
void rewrite_block(torch::jit::Module& block, const std::string& path, bool sequential) {
  auto graph = compat::method_graph(block.get_method("forward").function());
  Value* self = graph->inputs()[0];
  Node* first = nullptr;
  Node* last = nullptr;
  for (Node* n : graph->nodes()) {
    const std::string child = called_child(n, self);
    if (first == nullptr && (child == "mlp" || child == "intermediate")) first = n;
    if (first != nullptr && (child == "mlp" || child == "output")) last = n;
  }
  if (first == nullptr || last == nullptr)
    throw InputError("method adaptformer puts an adapter beside each block's MLP, but block " + path + " calls no "
                     "module under a child named mlp (timm, torchvision, open_clip) or intermediate and output "
                     "(transformers); use method lora");
  // transformers' ViTOutput adds the residual inside: its output is not the MLP's alone.
  if (sequential && last->input(0)->node()->input(0) == self && called_child(last, self) == "output")
    throw InputError("adaptformer.sequential reads the MLP's output, but block " + path + " adds the residual inside "
                     "its `output` module; use the parallel form (adaptformer.sequential false) there");
  // AdaptFormer's input is the state the MLP's LayerNorm normalises (parallel), or the MLP's output (sequential).
  Value* input = sequential ? last->output() : first->input(1);
  const std::string norm = called_child(input->node(), self);
  if (!sequential && !norm.empty() && block.attr(norm).isModule() &&
      block.attr(norm).toModule().type()->name()->name().find("LayerNorm") != std::string::npos)
    input = input->node()->input(1);
  Node* call = graph->create(c10::prim::CallMethod, {self, input, last->output()}, 1);
  call->s_(c10::attr::name, "adaptformer_forward");
  call->output()->setType(c10::TensorType::get());
  call->insertAfter(last);
  last->output()->replaceAllUsesAfterNodeWith(call, call->output());
  graph->lint();
}

}  // namespace

void MlpAdapters::prepare(const Bundle& bundle, bool sequential) {
  if (!blocks_.empty()) {
    if (sequential != sequential_)
      throw InputError(std::string("the blocks carry ") + (sequential_ ? "sequential" : "parallel") + " AdaptFormer "
                       "adapters already; load the model anew for the other form");
    return;
  }
  std::vector<torch::jit::Module> blocks = bundle.blocks();
  const auto names = bundle.blocks_module().named_children();
  std::set<const c10::ClassType*> rewritten;
  for (const auto& child : names) {
    torch::jit::Module block = child.value;
    const std::string path = bundle.info.blocks + "." + child.name;
    const bool first_of_type = rewritten.insert(block.type().get()).second;
    if (first_of_type && block.type()->hasAttribute(kScale))
      throw InputError(bundle.path.filename().string() + " already carries AdaptFormer adapters (a merged file?); "
                       "adapt the base it was made from");
    for (const auto& name : attribute_names()) block.register_attribute(name, c10::TensorType::get(), at::zeros({0}));
    block.register_attribute(kScale, c10::FloatType::get(), 0.0);
    if (first_of_type) {
      block.define(kForwardCode);
      rewrite_block(block, path, sequential);
    }
  }
  blocks_ = std::move(blocks);
  sequential_ = sequential;
}

void MlpAdapters::init(const AdaptFormerSettings& settings, const Bundle& bundle) {
  const int64_t width = token_layout(bundle, Method::kAdaptFormer).width;
  if (settings.bottleneck < 1) throw InputError("adaptformer.bottleneck must be at least 1");
  at::NoGradGuard no_grad;
  const double bound = 1.0 / std::sqrt(static_cast<double>(width));  // nn.Linear's Down, as AdaptFormer starts it
  std::vector<std::vector<at::Tensor>> tensors;
  for (size_t i = 0; i < bundle.blocks().size(); ++i)
    tensors.push_back({at::rand({settings.bottleneck, width}) * (2 * bound) - bound, at::zeros({settings.bottleneck}),
                       at::zeros({width, settings.bottleneck}), at::zeros({width})});
  set(settings, bundle, tensors, "adaptformer settings");
}

void MlpAdapters::set(const AdaptFormerSettings& settings, const Bundle& bundle,
                      const std::vector<std::vector<at::Tensor>>& tensors, const std::string& origin) {
  const int64_t width = token_layout(bundle, Method::kAdaptFormer).width;
  const size_t blocks = bundle.blocks().size();
  if (tensors.size() != blocks)
    throw InputError(origin + " holds adapters for " + std::to_string(tensors.size()) + " blocks; the model has " +
                     std::to_string(blocks) + ": it was made for another base");
  const std::vector<std::vector<int64_t>> shapes = {
      {settings.bottleneck, width}, {settings.bottleneck}, {width, settings.bottleneck}, {width}};
  for (const auto& block : tensors)
    for (size_t k = 0; k < shapes.size(); ++k)
      if (block.size() != shapes.size() || !block[k].defined() || block[k].sizes() != at::IntArrayRef(shapes[k]))
        throw InputError(origin + " holds an adapter " + adaptformer_tensor_names()[k] + " that does not fit " +
                         c10::str(at::IntArrayRef(shapes[k])) + " (bottleneck " + std::to_string(settings.bottleneck) +
                         ", width " + std::to_string(width) + "): it was made for another base");
  prepare(bundle, settings.sequential);
  settings_ = settings;
  tensors_.clear();
  for (const auto& block : tensors) {
    tensors_.emplace_back();
    for (const auto& t : block) tensors_.back().push_back(t.detach().to(at::kFloat).clone());
  }
  attach();
}

void MlpAdapters::attach() {
  const auto& names = attribute_names();
  for (size_t i = 0; i < blocks_.size(); ++i) {
    for (size_t k = 0; k < names.size(); ++k) blocks_[i].setattr(names[k], tensors_.at(i).at(k));
    blocks_[i].setattr(kScale, settings_.scale);
  }
}

void MlpAdapters::clear() {
  for (auto& block : blocks_) block.setattr(kScale, 0.0);
  tensors_.clear();
}

void MlpAdapters::set_trainable(bool on) {
  for (auto& block : tensors_)
    for (auto& t : block) t.requires_grad_(on);
}

void MlpAdapters::to(const c10::Device& device) {
  if (!defined()) return;
  for (auto& block : tensors_)
    for (auto& t : block) {
      const bool trains = t.requires_grad();
      t = t.detach().to(device).requires_grad_(trains);
    }
  attach();
}

void MlpAdapters::append_trainable(std::vector<NamedTensor>& out) const {
  for (size_t i = 0; i < tensors_.size(); ++i)
    for (size_t k = 0; k < tensors_[i].size(); ++k)
      if (tensors_[i][k].requires_grad())
        out.push_back({"adaptformer." + std::to_string(i) + "." + adaptformer_tensor_names()[k], tensors_[i][k]});
}

int64_t MlpAdapters::parameter_count() const {
  int64_t n = 0;
  for (const auto& block : tensors_)
    for (const auto& t : block) n += t.numel();
  return n;
}

}  // namespace loratune
