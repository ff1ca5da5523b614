// The adapter variants and their registry: plain LoRA, W' = W + s * B @ A on the target's rows, DoRA, LoRA-FA and
// SSF.
#include "loratune/adapter_variant.h"

#include <ATen/core/grad_mode.h>
#include <ATen/ATen.h>

#include "common/value_rules.h"
#include "loratune/adapter_init.h"
#include "loratune/errors.h"

namespace loratune {

std::vector<int64_t> AdapterTensorSpec::shape_for(const LoraTarget& t) const {
  std::vector<int64_t> sizes;
  for (const AdapterDim d : shape)
    sizes.push_back(d == AdapterDim::kRank ? t.rank : d == AdapterDim::kInFeatures ? t.in_features : t.rows);
  return sizes;
}

int64_t AdapterVariant::parameter_count(const LoraTarget& t) const {
  int64_t count = 0;
  for (const auto& spec : tensor_specs()) {
    int64_t n = 1;
    for (const int64_t size : spec.shape_for(t)) n *= size;
    count += n;
  }
  return count;
}

void AdapterVariant::check(const LoraTarget& t, const std::string& origin) const {
  const auto& specs = tensor_specs();
  for (size_t k = 0; k < specs.size(); ++k) {
    const std::string what = origin + ": adapter " + t.describe();  // names the variant unless plain LoRA
    if (k >= t.tensors.size() || !t.tensors[k].defined())
      throw InputError(what + " has no lora_" + specs[k].name + " (a " + name() + " adapter has " +
                       std::to_string(specs.size()) + " tensors per weight)");
    const auto expected = specs[k].shape_for(t);
    if (t.tensors[k].sizes() != at::IntArrayRef(expected))
      throw InputError(what + " has lora_" + specs[k].name + " of shape " + c10::str(t.tensors[k].sizes()) + ", not " +
                       c10::str(at::IntArrayRef(expected)));
  }
}

at::Tensor AdapterVariant::merged_bias_rows(const LoraTarget&, const at::Tensor& base_rows, double) const {
  return base_rows.to(at::kFloat);
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

// LoRA's A [rank, in] and B [rows, rank]; B is the up-projection LoRA+ speeds up.
std::vector<AdapterTensorSpec> lora_specs() {
  return {{"A", {AdapterDim::kRank, AdapterDim::kInFeatures}, false}, {"B", {AdapterDim::kRows, AdapterDim::kRank}, true}};
}

class Lora : public AdapterVariant {
 public:
  std::string name() const override { return "lora"; }
  std::string summary() const override { return "W + s * B @ A (Hu et al. 2021)"; }
  std::string peft_flag() const override { return ""; }

  const std::vector<AdapterTensorSpec>& tensor_specs() const override {
    static const std::vector<AdapterTensorSpec> specs = lora_specs();
    return specs;
  }

  void init(LoraTarget& t, const at::Tensor& base_rows, const AdapterInit& start) const override {
    at::NoGradGuard no_grad;
    auto [a, b] = start.start(t, base_rows);
    const auto& specs = tensor_specs();
    t.tensors = {a.requires_grad_(specs[0].trainable), b.requires_grad_(specs[1].trainable)};
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
  std::string summary() const override {
    return "weight-decomposed: a trained magnitude per output row (Liu et al. 2024; PEFT's use_dora)";
  }
  std::string peft_flag() const override { return "use_dora"; }

  const std::vector<AdapterTensorSpec>& tensor_specs() const override {
    static const std::vector<AdapterTensorSpec> specs = [] {
      auto s = lora_specs();
      s.push_back({"magnitude_vector", {AdapterDim::kRows}});
      return s;
    }();
    return specs;
  }

  // The magnitude starts at the row norms of W before the start took anything (= W - s*B0@A0 + s*B0@A0): the
  // adapted model starts as the base whatever the start.
  void init(LoraTarget& t, const at::Tensor& base_rows, const AdapterInit& start) const override {
    Lora::init(t, base_rows, start);
    at::NoGradGuard no_grad;
    t.tensors.push_back(base_rows.to(at::kFloat).norm(2, {1}).requires_grad_(true));
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

// LoRA-FA (Zhang et al. 2023): A stays at its random initialisation, only B trains (half the optimiser state, and
// backward needs no input activations for A). The file is plain LoRA: PEFT loads it as one.
class LoraFa : public Lora {
 public:
  std::string name() const override { return "lora_fa"; }
  std::string summary() const override { return "A fixed at its random start, only B trains (Zhang et al. 2023)"; }

  const std::vector<AdapterTensorSpec>& tensor_specs() const override {
    static const std::vector<AdapterTensorSpec> specs = [] {
      auto s = lora_specs();
      s[0].trainable = false;
      return s;
    }();
    return specs;
  }
};

// SSF (Lian et al. 2022): the target's outputs scaled and shifted per row, y' = y * scale + shift, i.e.
// W' = diag(scale) W and b' = scale * b + shift, so it folds into the weight and bias. Starts as the paper's code:
// scale ~ N(1, 0.02), shift ~ N(0, 0.02). It has no rank, alpha or dropout.
constexpr const char* kSsfVectorCode = R"(
def lora_vector(self, parts: List[Tensor], fill: float, n: int, like: Tensor) -> Tensor:
    if len(parts) == 1 and parts[0].size(0) == n:
        return parts[0].to(like.dtype)
    pieces: List[Tensor] = []
    pos = 0
    for i in range(len(parts)):
        start = self.lora_rows[i]
        if start > pos:
            pieces.append(torch.full([start - pos], fill, dtype=like.dtype, device=like.device))
        pieces.append(parts[i].to(like.dtype))
        pos = start + parts[i].size(0)
    if pos < n:
        pieces.append(torch.full([n - pos], fill, dtype=like.dtype, device=like.device))
    return torch.cat(pieces, 0)
)";

class Ssf : public AdapterVariant {
 public:
  std::string name() const override { return "ssf"; }
  std::string summary() const override {
    return "a trained scale and shift of each output row, y * scale + shift; no rank (Lian et al. 2022)";
  }
  std::string peft_flag() const override { return ""; }
  bool low_rank() const override { return false; }

  const std::vector<AdapterTensorSpec>& tensor_specs() const override {
    static const std::vector<AdapterTensorSpec> specs = {{"ssf_scale", {AdapterDim::kRows}},
                                                         {"ssf_shift", {AdapterDim::kRows}}};
    return specs;
  }

  void init(LoraTarget& t, const at::Tensor&, const AdapterInit&) const override {
    at::NoGradGuard no_grad;
    t.tensors = {(at::randn({t.rows}) * kInitStd + 1.0).requires_grad_(true),
                 (at::randn({t.rows}) * kInitStd).requires_grad_(true)};
  }

  const char* activation_code() const override {
    static const std::string code = std::string(kSsfVectorCode) + R"(
def lora_forward(self, x: Tensor, y: Tensor) -> Tensor:
    if not self.lora_enabled:
        return y
    n = y.size(-1)
    return y * self.lora_vector(self.lora_ssf_scale, 1.0, n, y) + self.lora_vector(self.lora_ssf_shift, 0.0, n, y)
)";
    return code.c_str();
  }
  const char* weight_code() const override {
    static const std::string code = std::string(kSsfVectorCode) + R"(
def lora_weight(self, w: Tensor) -> Tensor:
    if not self.lora_enabled:
        return w
    return w * self.lora_vector(self.lora_ssf_scale, 1.0, w.size(0), w).unsqueeze(1)
)";
    return code.c_str();
  }
  const char* bias_code() const override {
    return R"(
def lora_bias(self, b: Tensor) -> Tensor:
    if not self.lora_enabled:
        return b
    n = b.size(0)
    return b * self.lora_vector(self.lora_ssf_scale, 1.0, n, b) + self.lora_vector(self.lora_ssf_shift, 0.0, n, b)
)";
  }

  at::Tensor merged_rows(const LoraTarget& t, const at::Tensor& base_rows, double strength) const override {
    const at::Tensor base = base_rows.to(at::kFloat);
    return base + (base * t.tensors[0].to(at::kFloat).unsqueeze(1) - base) * strength;
  }
  at::Tensor merged_bias_rows(const LoraTarget& t, const at::Tensor& base_rows, double strength) const override {
    const at::Tensor base = base_rows.to(at::kFloat);
    const at::Tensor adapted = base * t.tensors[0].to(at::kFloat) + t.tensors[1].to(at::kFloat);
    return base + (adapted - base) * strength;
  }

 private:
  static constexpr double kInitStd = 0.02;
};

}  // namespace

const AdapterVariant& lora_variant() {
  static const Lora lora;
  return lora;
}

const std::vector<const AdapterVariant*>& adapter_variants() {
  static const Dora dora;
  static const LoraFa lora_fa;
  static const Ssf ssf;
  static const std::vector<const AdapterVariant*> all = {&lora_variant(), &dora, &lora_fa, &ssf};
  return all;
}

std::vector<std::string> variant_names() {
  std::vector<std::string> names;
  for (const auto* v : adapter_variants()) names.push_back(v->name());
  return names;
}

const AdapterVariant* find_variant(const std::string& name) {
  for (const auto* v : adapter_variants())
    if (v->name() == name) return v;
  return nullptr;
}

const AdapterVariant& variant_by_name(const std::string& name) {
  if (const auto* v = find_variant(name)) return *v;
  throw InputError("lora.variant must be " + choices_text(variant_names()) + " (got \"" + name + "\")");
}

}  // namespace loratune
