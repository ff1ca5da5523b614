// Gradient checkpointing for TorchScript blocks: C++ has no torch.utils.checkpoint.
#include "model/gradient_checkpoint.h"

#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/jit/runtime/graph_executor.h>
#include <torch/csrc/jit/runtime/graph_iterator.h>

#include <optional>

#include "common/torch_compat.h"

namespace loratune {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct AutocastState {
  bool cpu = false, cuda = false;
  at::ScalarType cpu_dtype = at::kBFloat16, cuda_dtype = at::kHalf;

  static AutocastState current() {
    AutocastState s;
    s.cpu = compat::autocast_enabled(c10::DeviceType::CPU);
    s.cuda = compat::autocast_enabled(c10::DeviceType::CUDA);
    s.cpu_dtype = compat::autocast_dtype(c10::DeviceType::CPU);
    s.cuda_dtype = compat::autocast_dtype(c10::DeviceType::CUDA);
    return s;
  }
  void apply() const {
    compat::set_autocast_enabled(c10::DeviceType::CPU, cpu);
    compat::set_autocast_enabled(c10::DeviceType::CUDA, cuda);
    compat::set_autocast_dtype(c10::DeviceType::CPU, cpu_dtype);
    compat::set_autocast_dtype(c10::DeviceType::CUDA, cuda_dtype);
  }
};

struct BlockCheckpoint : public torch::autograd::Function<BlockCheckpoint> {
  static variable_list forward(AutogradContext* ctx, at::Tensor input, at::TensorList parameters,
                               torch::jit::Module block, bool forward_with_grad,
                               c10::intrusive_ptr<RecomputeHooks> hooks, int64_t index) {
    const AutocastState autocast = AutocastState::current();
    ctx->saved_data["block"] = block._ivalue();
    ctx->saved_data["autocast"] = std::vector<int64_t>{autocast.cpu, autocast.cuda, static_cast<int64_t>(autocast.cpu_dtype),
                                                       static_cast<int64_t>(autocast.cuda_dtype)};
    ctx->saved_data["rng_cpu"] = compat::default_generator(c10::Device(c10::kCPU)).get_state();
    if (input.is_cuda()) ctx->saved_data["rng_device"] = compat::default_generator(input.device()).get_state();
    ctx->saved_data["input_requires_grad"] = input.requires_grad();
    if (hooks) {
      ctx->saved_data["hooks"] = c10::IValue::make_capsule(hooks);
      ctx->saved_data["index"] = index;
    }
    std::vector<at::Tensor> saved{hooks ? hooks->stash_input(index, input) : input};
    saved.insert(saved.end(), parameters.begin(), parameters.end());
    ctx->save_for_backward(saved);
    if (!forward_with_grad) return {run_block(block, input)};
    // Same code path as the recompute: this block picks other kernels without grad mode, which would make the
    // forward and the recomputed activations differ. The graph built here covers one block and is dropped at once.
    at::AutoGradMode enable_grad(true);
    return {run_block(block, input.detach()).detach()};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    c10::intrusive_ptr<RecomputeHooks> hooks;
    int64_t index = 0;
    if (ctx->saved_data.count("hooks")) {
      hooks = c10::static_intrusive_pointer_cast<RecomputeHooks>(ctx->saved_data["hooks"].toCapsule());
      index = ctx->saved_data["index"].toInt();
    }
    const at::Tensor input = hooks ? hooks->restore_input(index, saved[0]) : saved[0];
    const std::vector<at::Tensor> parameters(saved.begin() + 1, saved.end());
    torch::jit::Module block(ctx->saved_data["block"].toObject());
    const auto flags = ctx->saved_data["autocast"].toIntVector();
    AutocastState recorded{flags[0] != 0, flags[1] != 0, static_cast<at::ScalarType>(flags[2]),
                           static_cast<at::ScalarType>(flags[3])};

    // Replay the random state of the forward pass (LoRA dropout), then put the current state back.
    auto cpu_gen = compat::default_generator(c10::Device(c10::kCPU));
    const at::Tensor cpu_now = cpu_gen.get_state();
    cpu_gen.set_state(ctx->saved_data["rng_cpu"].toTensor());
    at::Tensor device_now;
    std::optional<at::Generator> device_gen;
    if (input.is_cuda()) {
      device_gen = compat::default_generator(input.device());
      device_now = device_gen->get_state();
      device_gen->set_state(ctx->saved_data["rng_device"].toTensor());
    }

    const AutocastState outer = AutocastState::current();
    const bool input_requires_grad = ctx->saved_data["input_requires_grad"].toBool();
    at::Tensor x = input.detach().requires_grad_(input_requires_grad);
    at::Tensor out;
    if (hooks) hooks->before_recompute(index);
    {
      at::AutoGradMode enable_grad(true);
      // The executor's "no optimisation" flag is per thread, and CUDA backward runs on autograd's device thread:
      // without this the recompute would get the optimising executor's plan, unlike the forward.
      torch::jit::GraphOptimizerEnabledGuard plain_executor(false);
      recorded.apply();
      compat::clear_autocast_cache();  // casts cached elsewhere may be of older weights
      out = run_block(block, x);
      outer.apply();
      compat::clear_autocast_cache();
    }
    cpu_gen.set_state(cpu_now);
    if (device_gen) device_gen->set_state(device_now);

    std::vector<at::Tensor> wrt;
    if (input_requires_grad) wrt.push_back(x);
    for (const auto& p : parameters)
      if (p.requires_grad()) wrt.push_back(p);
    std::vector<at::Tensor> grads;
    if (!wrt.empty() && out.requires_grad())
      grads = torch::autograd::grad({out}, wrt, {grad_outputs[0]}, /*retain_graph=*/false, /*create_graph=*/false,
                                    /*allow_unused=*/true);
    out = at::Tensor();  // the recomputed graph, and with it the block's weights, goes before the next block's
    if (hooks) hooks->after_recompute(index);
    variable_list result;
    size_t next = 0;
    result.push_back(input_requires_grad && !grads.empty() ? grads[next++] : at::Tensor());
    for (const auto& p : parameters) result.push_back(p.requires_grad() && !grads.empty() ? grads[next++] : at::Tensor());
    result.push_back(at::Tensor());  // the block itself
    result.push_back(at::Tensor());  // forward_with_grad
    result.push_back(at::Tensor());  // hooks
    result.push_back(at::Tensor());  // index
    return result;
  }
};

}  // namespace

at::Tensor run_block(const torch::jit::Module& block, const at::Tensor& input) {
  auto m = block;  // forward() is non-const
  const c10::IValue out = m.forward({input});
  if (out.isTuple()) return out.toTuple()->elements().at(0).toTensor();
  return out.toTensor();
}

at::Tensor checkpointed_block(const torch::jit::Module& block, const at::Tensor& input,
                              const std::vector<at::Tensor>& parameters, bool forward_with_grad,
                              c10::intrusive_ptr<RecomputeHooks> hooks, int64_t index) {
  return BlockCheckpoint::apply(input, at::TensorList(parameters), block, forward_with_grad, std::move(hooks), index)[0];
}

bool has_grad_mode_dependent_kernels(const torch::jit::Module& module) {
  const auto fast_path = c10::Symbol::fromQualString("aten::_native_multi_head_attention");
  for (const auto& m : module.modules())
    for (const auto& method : m.get_methods()) {
      auto graph = compat::method_graph(method.function());
      torch::jit::DepthFirstGraphNodeIterator it(graph);
      for (torch::jit::Node* n = it.next(); n != nullptr; n = it.next())
        if (n->kind() == fast_path) return true;
    }
  return false;
}

}  // namespace loratune
