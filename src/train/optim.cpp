#include "loratune/optim.h"

#include <ATen/core/grad_mode.h>
#include <ATen/ATen.h>

#include <cmath>

#include "loratune/errors.h"

namespace loratune {

AdamW::AdamW(std::vector<NamedTensor> params, AdamWOptions options) : options_(options) {
  for (auto& p : params) {
    Slot s{std::move(p), {}, {}, 1.0};
    s.exp_avg = at::zeros_like(s.param.tensor, at::MemoryFormat::Contiguous).to(at::kFloat);
    s.exp_avg_sq = at::zeros_like(s.exp_avg);
    slots_.push_back(std::move(s));
  }
}

void AdamW::set_lr_multiplier(const std::string& name, double multiplier) {
  for (auto& s : slots_)
    if (s.param.name == name) s.lr_multiplier = multiplier;
}

void AdamW::step(double lr) {
  at::NoGradGuard no_grad;
  ++steps_;
  const double bias1 = 1.0 - std::pow(options_.beta1, static_cast<double>(steps_));
  const double bias2_sqrt = std::sqrt(1.0 - std::pow(options_.beta2, static_cast<double>(steps_)));
  for (auto& s : slots_) {
    at::Tensor& p = s.param.tensor;
    const at::Tensor& grad = p.grad();
    if (!grad.defined()) continue;
    const double rate = lr * s.lr_multiplier;
    if (options_.weight_decay != 0.0 && p.dim() >= 2) p.mul_(1.0 - rate * options_.weight_decay);
    s.exp_avg.mul_(options_.beta1).add_(grad, 1.0 - options_.beta1);
    s.exp_avg_sq.mul_(options_.beta2).addcmul_(grad, grad, 1.0 - options_.beta2);
    const at::Tensor denom = (s.exp_avg_sq.sqrt() / bias2_sqrt).add_(options_.eps);
    p.addcdiv_(s.exp_avg, denom, -rate / bias1);
  }
}

void AdamW::zero_grad() {
  for (auto& s : slots_) {
    at::Tensor& g = s.param.tensor.mutable_grad();
    if (g.defined()) g.zero_();
  }
}

safetensors::Tensors AdamW::state() const {
  safetensors::Tensors out;
  for (const auto& s : slots_) {
    out["adamw." + s.param.name + ".exp_avg"] = s.exp_avg;
    out["adamw." + s.param.name + ".exp_avg_sq"] = s.exp_avg_sq;
  }
  out["adamw.steps"] = at::tensor(steps_, at::kLong);
  return out;
}

void AdamW::load_state(const safetensors::Tensors& state) {
  auto get = [&](const std::string& key) -> const at::Tensor& {
    auto it = state.find(key);
    if (it == state.end()) throw InputError("checkpoint has no optimiser state " + key);
    return it->second;
  };
  at::NoGradGuard no_grad;
  for (auto& s : slots_) {
    s.exp_avg.copy_(get("adamw." + s.param.name + ".exp_avg"));
    s.exp_avg_sq.copy_(get("adamw." + s.param.name + ".exp_avg_sq"));
  }
  steps_ = get("adamw.steps").item<int64_t>();
}

double scheduled_lr(int64_t step, int64_t total_steps, int64_t warmup_steps, double base_lr, double min_ratio) {
  if (warmup_steps > 0 && step < warmup_steps) return base_lr * static_cast<double>(step + 1) / warmup_steps;
  const int64_t decay_steps = std::max<int64_t>(1, total_steps - warmup_steps);
  const double progress = std::min(1.0, static_cast<double>(step - warmup_steps) / decay_steps);
  const double cosine = 0.5 * (1.0 + std::cos(M_PI * progress));
  return base_lr * (min_ratio + (1.0 - min_ratio) * cosine);
}

double clip_grad_norm(const std::vector<NamedTensor>& params, double max_norm) {
  at::NoGradGuard no_grad;
  std::vector<at::Tensor> norms;
  for (const auto& p : params)
    if (p.tensor.grad().defined()) norms.push_back(p.tensor.grad().to(at::kFloat).norm());
  if (norms.empty()) return 0.0;
  const double total = at::stack(norms).norm().item<double>();
  if (max_norm > 0 && std::isfinite(total)) {
    const double coef = max_norm / (total + 1e-6);
    if (coef < 1.0)
      for (const auto& p : params)
        if (p.tensor.grad().defined()) p.tensor.mutable_grad().mul_(coef);
  }
  return total;
}

}  // namespace loratune
