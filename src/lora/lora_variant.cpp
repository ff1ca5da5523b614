// Target keys, and plain LoRA as an adapter variant: W' = W + s * B @ A on the target's rows.
#include <ATen/core/grad_mode.h>
#include <ATen/ATen.h>

#include <cmath>

#include "loratune/errors.h"
#include "loratune/lora.h"

namespace loratune {

std::string TargetKey::name() const { return module + "." + param + (slice.empty() ? "" : "." + slice); }

std::pair<int64_t, int64_t> TargetKey::rows_in(int64_t weight_rows) const {
  if (slice.empty()) return {0, weight_rows};
  const int64_t third = weight_rows / 3;
  return {(slice == "q" ? 0 : slice == "k" ? 1 : 2) * third, third};
}

bool TargetKey::operator<(const TargetKey& o) const {
  return std::tie(module, param, slice) < std::tie(o.module, o.param, o.slice);
}

bool TargetKey::operator==(const TargetKey& o) const {
  return module == o.module && param == o.param && slice == o.slice;
}

namespace {

// Slices of a fused weight are placed at their rows (`lora_rows`); one adapter over the whole weight is added
// directly.
constexpr const char* kActivationCode = R"(
def lora_forward(self, x: Tensor, y: Tensor) -> Tensor:
    if not self.lora_enabled:
        return y
    if self.lora_training and self.lora_dropout > 0.0:
        x = torch.dropout(x, self.lora_dropout, True)
    for i in range(len(self.lora_A)):
        d = torch.linear(torch.linear(x, self.lora_A[i]) * self.lora_scale[i], self.lora_B[i])
        if len(self.lora_A) == 1 and d.size(-1) == y.size(-1):
            y = y + d
        else:
            y.narrow(-1, self.lora_rows[i], d.size(-1)).add_(d)
    return y
)";

// The weight wiring: each slice's change spliced into w at its rows. `{change}` computes slice i's change from
// d = s * B @ A and rows = its rows of w.
std::string weight_wiring_code(const std::string& change) {
  std::string code = R"(
def lora_weight(self, w: Tensor) -> Tensor:
    if not self.lora_enabled:
        return w
    parts: List[Tensor] = []
    pos = 0
    for i in range(len(self.lora_A)):
        d = torch.mm(self.lora_B[i], self.lora_A[i]) * self.lora_scale[i]
        start = self.lora_rows[i]
        if start > pos:
            parts.append(torch.zeros([start - pos, w.size(1)], dtype=d.dtype, device=d.device))
{change}
        pos = start + d.size(0)
    if pos < w.size(0):
        parts.append(torch.zeros([w.size(0) - pos, w.size(1)], dtype=parts[0].dtype, device=parts[0].device))
    return w + torch.cat(parts, 0)
)";
  return code.replace(code.find("{change}"), 8, change);
}

class Lora : public AdapterVariant {
 public:
  std::string name() const override { return "lora"; }

  const std::vector<std::string>& tensor_names() const override {
    static const std::vector<std::string> names = {"A", "B"};
    return names;
  }

  void init(LoraTarget& t, const at::Tensor&) const override {
    at::NoGradGuard no_grad;
    const double bound = 1.0 / std::sqrt(static_cast<double>(t.in_features));
    t.tensors = {at::empty({t.rank, t.in_features}, at::kFloat).uniform_(-bound, bound).requires_grad_(true),
                 at::zeros({t.rows, t.rank}, at::kFloat).requires_grad_(true)};
  }

  void check(const LoraTarget& t, const std::string& origin) const override {
    if (t.tensors.size() < 2 || !t.A().defined() || !t.B().defined())
      throw InputError(origin + ": adapter " + t.describe() + " needs both lora_A and lora_B");
    if (t.A().sizes() != at::IntArrayRef{t.rank, t.in_features} || t.B().sizes() != at::IntArrayRef{t.rows, t.rank})
      throw InputError(origin + ": adapter " + t.describe() + " has tensors of the wrong shape (lora_A " +
                       c10::str(t.A().sizes()) + ", lora_B " + c10::str(t.B().sizes()) + ")");
  }

  const char* activation_code() const override { return kActivationCode; }
  const char* weight_code() const override {
    static const std::string code = weight_wiring_code("        parts.append(d)");
    return code.c_str();
  }

  at::Tensor merged_rows(const LoraTarget& t, const at::Tensor& base_rows, double strength) const override {
    return base_rows.to(at::kFloat) + at::mm(t.B().to(at::kFloat), t.A().to(at::kFloat)) * (t.scale() * strength);
  }
};

// DoRA: each adapted row is rescaled to its trained magnitude, W' = m * (W + s*B@A) / ||W + s*B@A||, the norm
// taken per output row and detached (as in PEFT and section 4.3 of the paper). Applied to the weight, so every
// layout takes it the same way.
class Dora : public Lora {
 public:
  std::string name() const override { return "dora"; }

  const std::vector<std::string>& tensor_names() const override {
    static const std::vector<std::string> names = {"A", "B", "magnitude_vector"};
    return names;
  }

  void init(LoraTarget& t, const at::Tensor& base_rows) const override {
    Lora::init(t, base_rows);
    at::NoGradGuard no_grad;
    t.tensors.push_back(base_rows.to(at::kFloat).norm(2, {1}).requires_grad_(true));
  }

  void check(const LoraTarget& t, const std::string& origin) const override {
    if (t.tensors.size() != 3 || !t.tensors[2].defined())
      throw InputError(origin + ": DoRA adapter " + t.describe() + " has no lora_magnitude_vector");
    Lora::check(t, origin);
    if (t.tensors[2].sizes() != at::IntArrayRef{t.rows})
      throw InputError(origin + ": DoRA adapter " + t.describe() + " has a magnitude vector of shape " +
                       c10::str(t.tensors[2].sizes()) + ", not [" + std::to_string(t.rows) + "]");
  }

  const char* activation_code() const override { return nullptr; }
  const char* weight_code() const override {
    static const std::string code = weight_wiring_code(
        "        rows = w.narrow(0, start, d.size(0))\n"
        "        adapted = rows + d\n"
        "        norm = adapted.norm(2, [1], True).detach()\n"
        "        parts.append(self.lora_magnitude_vector[i].unsqueeze(1) * adapted / norm - rows)");
    return code.c_str();
  }

  at::Tensor merged_rows(const LoraTarget& t, const at::Tensor& base_rows, double strength) const override {
    const at::Tensor base = base_rows.to(at::kFloat);
    const at::Tensor adapted = Lora::merged_rows(t, base, 1.0);
    const at::Tensor dora = t.tensors[2].to(at::kFloat).unsqueeze(1) * adapted / adapted.norm(2, {1}, true);
    return base + (dora - base) * strength;
  }

};

}  // namespace

const AdapterVariant& lora_variant() {
  static const Lora lora;
  return lora;
}

const AdapterVariant& dora_variant() {
  static const Dora dora;
  return dora;
}

const AdapterVariant& variant_by_name(const std::string& name) {
  if (name == "lora") return lora_variant();
  if (name == "dora") return dora_variant();
  throw InputError("lora.variant must be lora or dora (got \"" + name + "\")");
}

}  // namespace loratune
