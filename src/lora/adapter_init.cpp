// The starts of A and B: PEFT's kaiming-uniform default, Gaussian, PiSSA and OLoRA (peft/tuners/lora/layer.py).
#include "loratune/adapter_init.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <cmath>

#include "common/value_rules.h"
#include "loratune/errors.h"

namespace loratune {
namespace {

// A as nn.Linear's default (kaiming_uniform with a = sqrt(5): bound 1/sqrt(in)), B = 0: the adapter starts at zero.
class KaimingUniform : public AdapterInit {
 public:
  std::string name() const override { return "kaiming_uniform"; }
  std::string summary() const override { return "A uniform in +-1/sqrt(in), B = 0 (PEFT's default, init_lora_weights true)"; }
  std::pair<at::Tensor, at::Tensor> start(const LoraTarget& t, const at::Tensor&) const override {
    const double bound = 1.0 / std::sqrt(static_cast<double>(t.in_features));
    return {at::empty({t.rank, t.in_features}, at::kFloat).uniform_(-bound, bound), at::zeros({t.rows, t.rank}, at::kFloat)};
  }
};

class Gaussian : public AdapterInit {
 public:
  std::string name() const override { return "gaussian"; }
  std::string summary() const override { return "A normal with std 1/r, B = 0 (as diffusers)"; }
  std::pair<at::Tensor, at::Tensor> start(const LoraTarget& t, const at::Tensor&) const override {
    return {at::empty({t.rank, t.in_features}, at::kFloat).normal_(0.0, 1.0 / static_cast<double>(t.rank)),
            at::zeros({t.rows, t.rank}, at::kFloat)};
  }
};

// The r principal singular directions of the rows: W = U S Vh, A = sqrt(S_r / s) Vh_r, B = U_r sqrt(S_r / s), so
// s * B @ A is W's best rank-r part (Meng et al. 2024).
class Pissa : public AdapterInit {
 public:
  std::string name() const override { return "pissa"; }
  std::string summary() const override {
    return "A and B from the r largest singular values of W, which keeps the rest (Meng et al. 2024)";
  }
  bool takes_from_weight() const override { return true; }
  std::pair<at::Tensor, at::Tensor> start(const LoraTarget& t, const at::Tensor& base_rows) const override {
    const auto [u, s, vh] = at::linalg_svd(base_rows.to(at::kFloat), /*full_matrices=*/false);
    const at::Tensor root = (s.narrow(0, 0, t.rank) / t.scale()).sqrt();
    return {(root.unsqueeze(1) * vh.narrow(0, 0, t.rank)).contiguous(),
            (u.narrow(1, 0, t.rank) * root.unsqueeze(0)).contiguous()};
  }
};

// W = Q R: B = Q's first r columns, A = R's first r rows (Büyükakyüz 2024).
class Olora : public AdapterInit {
 public:
  std::string name() const override { return "olora"; }
  std::string summary() const override {
    return "B orthonormal, A from the QR decomposition of W, which keeps the rest (Buyukakyuz 2024)";
  }
  bool takes_from_weight() const override { return true; }
  std::pair<at::Tensor, at::Tensor> start(const LoraTarget& t, const at::Tensor& base_rows) const override {
    const auto [q, r] = at::linalg_qr(base_rows.to(at::kFloat), "reduced");
    return {r.narrow(0, 0, t.rank).contiguous(), q.narrow(1, 0, t.rank).contiguous()};
  }
};

}  // namespace

const std::vector<const AdapterInit*>& adapter_inits() {
  static const KaimingUniform kaiming;
  static const Gaussian gaussian;
  static const Pissa pissa;
  static const Olora olora;
  static const std::vector<const AdapterInit*> all = {&kaiming, &gaussian, &pissa, &olora};
  return all;
}

std::vector<std::string> adapter_init_names() {
  std::vector<std::string> names;
  for (const auto* i : adapter_inits()) names.push_back(i->name());
  return names;
}

const AdapterInit& default_adapter_init() { return *adapter_inits().front(); }

const AdapterInit* find_adapter_init(const std::string& name) {
  for (const auto* i : adapter_inits())
    if (i->name() == name) return i;
  return nullptr;
}

const AdapterInit& adapter_init_by_name(const std::string& name) {
  if (const auto* i = find_adapter_init(name)) return *i;
  throw InputError("lora.init must be " + choices_text(adapter_init_names()) + " (got \"" + name + "\")");
}

namespace {

// The alpha that keeps s = alpha / r (or alpha / sqrt(r)) when the rank doubles.
double alpha_for_double_rank(double alpha, bool rslora) { return rslora ? alpha * std::sqrt(2.0) : 2 * alpha; }

}  // namespace

LoraTarget on_unmodified_base(const LoraTarget& t) {
  if (!t.taken_A.defined()) return t;
  at::NoGradGuard no_grad;
  LoraTarget out = t;
  out.rank = 2 * t.rank;
  out.alpha = alpha_for_double_rank(t.alpha, t.rslora);
  out.tensors[0] = at::cat({t.A().detach().to(at::kCPU, at::kFloat), t.taken_A.to(at::kCPU, at::kFloat)}, 0);
  out.tensors[1] = at::cat({t.B().detach().to(at::kCPU, at::kFloat), -t.taken_B.to(at::kCPU, at::kFloat)}, 1);
  out.taken_A = out.taken_B = at::Tensor();
  return out;
}

LoraSettings settings_on_unmodified_base(LoraSettings s) {
  s.rank *= 2;
  s.alpha = alpha_for_double_rank(s.alpha, s.rslora);
  for (auto& [pattern, rank] : s.rank_pattern) rank *= 2;
  for (auto& [pattern, alpha] : s.alpha_pattern) alpha = alpha_for_double_rank(alpha, s.rslora);
  return s;
}

}  // namespace loratune
