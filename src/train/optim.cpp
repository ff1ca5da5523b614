#include "loratune/optim.h"

#include <ATen/core/grad_mode.h>
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>

#include "loratune/errors.h"
#include "train/checkpoint.h"

namespace loratune {

AdamW::AdamW(std::vector<NamedTensor> params, AdamWOptions options) : options_(options) {
  for (auto& p : params) slots_.push_back({std::move(p), 1.0, 0, 0});
  regroup();
}

void AdamW::set_lr_multiplier(const std::string& name, double multiplier) {
  for (auto& s : slots_)
    if (s.param.name == name && s.lr_multiplier != multiplier) s.lr_multiplier = multiplier, regroup_ = true;
}

at::Tensor AdamW::view(const Slot& s, const at::Tensor& flat) const {
  return flat.narrow(0, s.offset, s.param.tensor.numel()).view(s.param.tensor.sizes());
}

void AdamW::regroup() {
  at::NoGradGuard no_grad;
  std::vector<Group> groups;
  std::vector<Slot> placed = slots_;
  std::vector<int64_t> sizes;
  for (auto& s : placed) {
    const at::Tensor& p = s.param.tensor;
    const bool decay = options_.weight_decay != 0.0 && p.dim() >= 2;
    auto same = [&](const Group& g) {
      return g.lr_multiplier == s.lr_multiplier && g.decay == decay && g.param.options().type_equal(p.options());
    };
    s.group = static_cast<size_t>(std::find_if(groups.begin(), groups.end(), same) - groups.begin());
    if (s.group == groups.size()) {
      groups.push_back({s.lr_multiplier, decay, at::empty({0}, p.options()), {}, {}, {}});
      sizes.push_back(0);
    }
    s.offset = sizes[s.group];
    sizes[s.group] += p.numel();
  }
  for (size_t k = 0; k < groups.size(); ++k) {
    Group& g = groups[k];
    const auto options = g.param.options();
    g.param = at::empty({sizes[k]}, options);
    g.grad = at::zeros({sizes[k]}, options);
    g.exp_avg = at::zeros({sizes[k]}, options.dtype(at::kFloat));
    g.exp_avg_sq = at::zeros({sizes[k]}, options.dtype(at::kFloat));
  }
  for (size_t i = 0; i < placed.size(); ++i) {
    Slot& s = placed[i];
    Group& g = groups[s.group];
    at::Tensor& p = s.param.tensor;
    if (!groups_.empty()) {  // moments carry over from the old groups
      view(s, g.exp_avg).copy_(view(slots_[i], groups_[slots_[i].group].exp_avg));
      view(s, g.exp_avg_sq).copy_(view(slots_[i], groups_[slots_[i].group].exp_avg_sq));
    }
    const at::Tensor param = view(s, g.param), grad = view(s, g.grad);
    param.copy_(p);
    if (p.grad().defined()) grad.copy_(p.grad());
    p.set_data(param);  // the same tensor (models and adapters hold it) over the group's storage
    p.mutable_grad() = grad;
  }
  slots_ = std::move(placed);
  groups_ = std::move(groups);
  regroup_ = false;
}

void AdamW::bind_gradients() {
  at::NoGradGuard no_grad;
  for (auto& s : slots_) {
    at::Tensor& p = s.param.tensor;
    const at::Tensor grad = view(s, groups_[s.group].grad);
    if (p.grad().defined() && p.grad().data_ptr() == grad.data_ptr()) continue;
    if (p.grad().defined()) grad.copy_(p.grad());
    else grad.zero_();
    p.mutable_grad() = grad;
  }
}

std::vector<at::Tensor> AdamW::gradients() {
  if (regroup_) regroup();
  bind_gradients();
  std::vector<at::Tensor> out;
  for (const auto& g : groups_) out.push_back(g.grad);
  return out;
}

void AdamW::step(double lr) {
  if (regroup_) regroup();
  bind_gradients();
  at::NoGradGuard no_grad;
  ++steps_;
  const double bias1 = 1.0 - std::pow(options_.beta1, static_cast<double>(steps_));
  const double bias2_sqrt = std::sqrt(1.0 - std::pow(options_.beta2, static_cast<double>(steps_)));
  for (auto& g : groups_) {
    const double rate = lr * g.lr_multiplier;
    if (g.decay) g.param.mul_(1.0 - rate * options_.weight_decay);
    g.exp_avg.mul_(options_.beta1).add_(g.grad, 1.0 - options_.beta1);
    g.exp_avg_sq.mul_(options_.beta2).addcmul_(g.grad, g.grad, 1.0 - options_.beta2);
    const at::Tensor denom = (g.exp_avg_sq.sqrt() / bias2_sqrt).add_(options_.eps);
    g.param.addcdiv_(g.exp_avg, denom, -rate / bias1);
  }
}

void AdamW::zero_grad() {
  bind_gradients();
  for (auto& g : groups_) g.grad.zero_();
}

safetensors::Tensors AdamW::state() const {
  safetensors::Tensors out;
  for (const auto& s : slots_) {
    out["adamw." + s.param.name + ".exp_avg"] = view(s, groups_[s.group].exp_avg);
    out["adamw." + s.param.name + ".exp_avg_sq"] = view(s, groups_[s.group].exp_avg_sq);
  }
  out["adamw.steps"] = at::tensor(steps_, at::kLong);
  return out;
}

void AdamW::load_state(const safetensors::Tensors& state, const std::string& origin) {
  if (regroup_) regroup();
  // Checked before anything is copied: a refused checkpoint leaves the state as it was.
  const at::Tensor& steps = stored_like(state, "adamw.steps", at::tensor(steps_, at::kLong), origin);
  if (steps.item<int64_t>() < 0) throw InputError("checkpoint optimiser state adamw.steps is negative");
  std::vector<std::pair<at::Tensor, const at::Tensor*>> copies;
  for (auto& s : slots_) {
    const at::Tensor avg = view(s, groups_[s.group].exp_avg), avg_sq = view(s, groups_[s.group].exp_avg_sq);
    copies.emplace_back(avg, &stored_like(state, "adamw." + s.param.name + ".exp_avg", avg, origin));
    const at::Tensor& stored_sq = stored_like(state, "adamw." + s.param.name + ".exp_avg_sq", avg_sq, origin);
    if ((stored_sq < 0).any().item<bool>())
      throw InputError("checkpoint optimiser state adamw." + s.param.name + ".exp_avg_sq has negative values");
    copies.emplace_back(avg_sq, &stored_sq);
  }
  at::NoGradGuard no_grad;
  for (auto& [to, from] : copies) to.copy_(*from);
  steps_ = steps.item<int64_t>();
}

double scheduled_lr(int64_t step, int64_t total_steps, int64_t warmup_steps, double base_lr, double min_ratio) {
  if (warmup_steps > 0 && step < warmup_steps) return base_lr * static_cast<double>(step + 1) / warmup_steps;
  const int64_t decay_steps = std::max<int64_t>(1, total_steps - warmup_steps);
  const double progress = std::min(1.0, static_cast<double>(step - warmup_steps) / decay_steps);
  const double cosine = 0.5 * (1.0 + std::cos(M_PI * progress));
  return base_lr * (min_ratio + (1.0 - min_ratio) * cosine);
}

double clip_grad_norm(const std::vector<at::Tensor>& grads, double max_norm) {
  at::NoGradGuard no_grad;
  std::vector<at::Tensor> norms;
  for (const auto& g : grads)
    if (g.defined()) norms.push_back(g.to(at::kFloat).norm());
  if (norms.empty()) return 0.0;
  const double total = at::stack(norms).norm().item<double>();
  if (max_norm > 0 && std::isfinite(total)) {
    const double coef = max_norm / (total + 1e-6);
    if (coef < 1.0)
      for (const auto& g : grads)
        if (g.defined()) at::Tensor(g).mul_(coef);
  }
  return total;
}

}  // namespace loratune
