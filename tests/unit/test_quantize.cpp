// Quantised frozen weights (frozen_dtype int8 / nf4): the formats against a float64 reading of them, and quantised
// models against the Python reference on weights the formats store exactly, against the same model on the dequantised
// weights, and near the dense model.
#include <ATen/core/grad_mode.h>
#include <gtest/gtest.h>

#include <cmath>

#include "loratune/adapter.h"
#include "loratune/adapter_binding.h"
#include "loratune/adapter_variant.h"
#include "loratune/amp.h"
#include "loratune/model.h"
#include "loratune/quantize.h"
#include "loratune/safetensors.h"
#include "loratune/targets.h"
#include "test_support.h"

namespace loratune {
namespace {

using test::fixture;
using test::scaled_diff;

// The NF4 values as published with QLoRA (Dettmers et al. 2023, appendix E), in float64.
const double kPublishedNf4[16] = {-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                                  -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                                  0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                                  0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0};

// max |a - b| over max |b|: float32 rounding of values computed in float64.
double relative_to_max(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kDouble) - b).abs().max().item<double>() / std::max(1e-300, b.abs().max().item<double>());
}

TEST(Quantize, Nf4CodeBookIsThePublishedOne) {
  for (int k = 0; k < 16; ++k) EXPECT_EQ(static_cast<double>(nf4_code_book()[k]), static_cast<double>(static_cast<float>(kPublishedNf4[k])));
}

// Fixed vectors: a block holding every code value at absmax 0.5 packs as known bytes and comes back exactly; an int8
// row holding every multiple of its scale too.
TEST(Quantize, FixedVectorsPackAsKnownBytesAndComeBackExactly) {
  std::vector<float> values;
  for (int k = 0; k < 64; ++k) values.push_back(0.5f * nf4_code_book()[(k * 7) % 16]);  // 7 is prime to 16
  const at::Tensor w = at::tensor(values).view({2, 32});
  const QuantizedWeight q = quantize_weight(w, QuantFormat::kNf4);
  ASSERT_EQ(q.data.numel(), 32);
  for (int j = 0; j < 32; ++j)
    EXPECT_EQ(q.data[j].item<int>(), (((2 * j * 7) % 16) << 4) | (((2 * j + 1) * 7) % 16)) << "byte " << j;
  EXPECT_TRUE(at::equal(dequantize_weight(q, at::kFloat), w));

  std::vector<float> row;
  for (int k = -127; k <= 127; ++k) row.push_back(static_cast<float>(k) / 1024.0f);
  const at::Tensor r = at::tensor(row).view({1, -1});
  const QuantizedWeight q8 = quantize_weight(r, QuantFormat::kInt8);
  EXPECT_EQ(q8.scale.item<float>(), 1.0f / 1024.0f);
  EXPECT_TRUE(at::equal(q8.data.to(at::kInt).view({-1}), at::arange(-127, 128, at::kInt)));
  EXPECT_TRUE(at::equal(dequantize_weight(q8, at::kFloat), r));
}

// Random weights of awkward shapes (a partial block, several groups of 256 blocks, a zero row): dequantisation equals
// the format read in float64, each stored value is the nearest one the format offers, and the error is bounded.
TEST(Quantize, DequantisationIsTheFormatReadInFloat64AndValuesAreNearest) {
  at::manual_seed(3);
  for (const auto& shape : std::vector<std::vector<int64_t>>{{7, 9}, {300, 130}, {1, 1}, {4, 64}}) {
    at::Tensor w = at::randn(shape) * at::rand({shape[0], 1}) * 3;
    w[0].zero_();
    SCOPED_TRACE(std::to_string(shape[0]) + "x" + std::to_string(shape[1]));
    const at::Tensor w64 = w.to(at::kDouble).reshape(-1);
    const int64_t n = w.numel();

    const QuantizedWeight q8 = quantize_weight(w, QuantFormat::kInt8);
    const at::Tensor scale64 = q8.scale.to(at::kDouble);
    const at::Tensor read8 = (q8.data.to(at::kDouble) * scale64.unsqueeze(1)).reshape(-1);
    EXPECT_LE(relative_to_max(dequantize_weight(q8, at::kFloat).reshape(-1), read8), 1.2e-7);
    const at::Tensor ideal = (w.to(at::kDouble) / scale64.clamp_min(1e-300).unsqueeze(1)).reshape(-1);
    EXPECT_LE(((q8.data.to(at::kDouble).reshape(-1) - ideal).abs() - 0.5).max().item<double>(), 1e-4);

    const QuantizedWeight q4 = quantize_weight(w, QuantFormat::kNf4);
    const int64_t blocks = (n + 63) / 64;
    ASSERT_EQ(q4.scale.numel(), blocks);
    ASSERT_EQ(q4.scale2.numel(), 1 + (blocks + 255) / 256);
    const auto bytes = q4.data.to(at::kLong);
    const at::Tensor index = at::stack({bytes.div(16, "floor"), bytes.remainder(16)}, 1).reshape(-1);
    const at::Tensor code = at::tensor(std::vector<double>(std::begin(kPublishedNf4), std::end(kPublishedNf4)));
    const at::Tensor group = at::arange(blocks, at::kLong).div(256, "floor") + 1;
    const at::Tensor absmax = q4.scale.to(at::kDouble) * q4.scale2.to(at::kDouble).index_select(0, group) +
                              q4.scale2[0].item<double>();
    const at::Tensor block_of = at::arange(n, at::kLong).div(64, "floor");
    const at::Tensor read4 = code.index_select(0, index.slice(0, 0, n)) * absmax.index_select(0, block_of);
    EXPECT_LE(relative_to_max(dequantize_weight(q4, at::kFloat).reshape(-1), read4), 5e-7);
    // Nearest: no code value is closer to w / absmax than the stored one (up to float32 rounding of the ratio).
    const at::Tensor a = absmax.index_select(0, block_of);
    const at::Tensor ratio = at::where(a != 0, w64 / a, at::zeros_like(w64));
    const at::Tensor chosen = (ratio - code.index_select(0, index.slice(0, 0, n))).abs();
    const at::Tensor best = (ratio.unsqueeze(1) - code.unsqueeze(0)).abs().amin(1);
    EXPECT_LE((chosen - best).max().item<double>(), 1e-6);
    // Block absmax values survive their 8-bit storage to within half a step of their group's scale.
    const at::Tensor true_absmax =
        at::constant_pad_nd(w64.abs(), {0, blocks * 64 - n}, 0).view({blocks, 64}).amax(1);
    const at::Tensor step = q4.scale2.to(at::kDouble).index_select(0, group);
    EXPECT_LE(((absmax - true_absmax).abs() - 0.5 * step).max().item<double>(), 1e-6);
  }
}

// The timm fixture with its blocks' Linear weights on the format's grid: quantising loses nothing, so the quantised
// model with the reference adapter gives the float64 Python results, with and without checkpointing.
class QuantizedGrid : public ::testing::TestWithParam<std::string> {};

TEST_P(QuantizedGrid, QuantisedModelGivesThePythonReference) {
  const std::string name = "timm_" + GetParam() + "grid_script";
  const auto ref = safetensors::read(fixture("models/ref_" + name + ".safetensors")).tensors;
  const QuantFormat format = GetParam() == "int8" ? QuantFormat::kInt8 : QuantFormat::kNf4;
  for (bool checkpoint : {false, true}) {
    SCOPED_TRACE(checkpoint ? "with checkpointing" : "without checkpointing");
    Model model(load_bundle(fixture("models/" + name + ".pt")));
    const auto adapter_dir = fixture("models/adapter_" + name);
    apply_adapter(model, load_adapter(adapter_dir), adapter_dir.string());
    model.to(c10::Device(c10::kCPU), at::kFloat, format);
    const FrozenQuantization& q = model.frozen_quantization();
    EXPECT_EQ(q.modules, 8);  // qkv, proj, fc1, fc2 in each of 2 blocks
    EXPECT_EQ(q.parameters, 2 * (96 * 32 + 32 * 32 + 64 * 32 + 32 * 64));
    EXPECT_LT(q.stored_bytes * (format == QuantFormat::kInt8 ? 3 : 6), q.dense_bytes);
    for (const auto& p : model.module().named_parameters())
      if (p.name.find(".blocks.") != std::string::npos && p.name.find("weight") != std::string::npos &&
          p.name.find("norm") == std::string::npos)
        EXPECT_EQ(p.value.numel(), 0) << p.name << " should hold no dense weight";
    const at::Tensor logits = model.logits(ref.at("input"), checkpoint);
    EXPECT_LT(scaled_diff(logits, ref.at("adapted_logits")), 1e-5);
    (logits * ref.at("probe")).sum().backward();
    const std::string& prefix = model.bundle().info.module_prefix;
    for (const auto& t : model.adapters())
      for (size_t k = 0; k < t.tensors.size(); ++k) {
        const std::string key = "grad.base_model.model." + t.module.substr(prefix.size()) + ".lora_" +
                                t.variant->tensor_specs()[k].name + "." + t.slice + ".weight";
        ASSERT_TRUE(t.tensors[k].grad().defined()) << key;
        EXPECT_LT(scaled_diff(t.tensors[k].grad(), ref.at(key)), 1e-5) << key;
      }
    EXPECT_LT(scaled_diff(model.head().weight().grad(), ref.at("grad.head.weight")), 1e-5);
  }
}

INSTANTIATE_TEST_SUITE_P(Formats, QuantizedGrid, ::testing::Values("int8", "nf4"));

struct QuantizedStep {
  at::Tensor logits;
  std::vector<at::Tensor> grads;  // adapters', then the head's
};

QuantizedStep adapted_step(Model& model, const at::Tensor& input, const at::Tensor& probe, bool checkpoint) {
  QuantizedStep s;
  s.logits = model.logits(input, checkpoint);
  (s.logits * probe).sum().backward();
  for (const auto& t : model.adapters())
    for (const auto& tensor : t.tensors) s.grads.push_back(tensor.grad().clone());
  s.grads.push_back(model.head().weight().grad().clone());
  s.logits = s.logits.detach();
  return s;
}

double cosine(const at::Tensor& a, const at::Tensor& b) {
  return (a.flatten() * b.flatten()).sum().item<double>() / (a.norm().item<double>() * b.norm().item<double>());
}

// On ordinary random weights (scripted and traced layouts; torchvision's attention reads its projection outside
// nn.Linear, so that one stays dense): the quantised step equals the dense step on the dequantised weights, and stays
// near the dense step on the original weights within the stated tolerances.
class QuantizedLayouts : public ::testing::TestWithParam<std::tuple<std::string, std::string>> {};

TEST_P(QuantizedLayouts, StepEqualsTheDequantisedWeightsAndStaysNearTheDenseStep) {
  const auto& [layout, format_name] = GetParam();
  const QuantFormat format = format_name == "int8" ? QuantFormat::kInt8 : QuantFormat::kNf4;
  const auto bundle = fixture("models/" + layout + ".pt");
  const auto adapter_dir = fixture("models/adapter_" + layout);
  const auto ref = safetensors::read(fixture("models/ref_" + layout + ".safetensors")).tensors;
  const at::Tensor input = ref.at("input"), probe = ref.at("probe");

  Model quantized(load_bundle(bundle));
  apply_adapter(quantized, load_adapter(adapter_dir), adapter_dir.string());
  quantized.to(c10::Device(c10::kCPU), at::kFloat, format);
  const FrozenQuantization& q = quantized.frozen_quantization();
  ASSERT_GT(q.modules, 0);
  EXPECT_EQ(q.kept.size(), layout.rfind("torchvision", 0) == 0 ? 2u : 0u);  // out_proj of each block

  // The same model with each quantised weight replaced by its dequantised value, computed densely.
  Model dequantized(load_bundle(bundle));
  apply_adapter(dequantized, load_adapter(adapter_dir), adapter_dir.string());
  Model dense(load_bundle(bundle));
  apply_adapter(dense, load_adapter(adapter_dir), adapter_dir.string());
  {
    at::NoGradGuard no_grad;
    for (const auto& path : q.quantized)
      for (const auto& m : dequantized.module().named_modules())
        if (m.name == path) {
          const at::Tensor w = m.value.attr("weight").toTensor();
          w.copy_(dequantize_weight(quantize_weight(w, format), at::kFloat));
        }
  }
  for (bool checkpoint : {false, true}) {
    SCOPED_TRACE(checkpoint ? "with checkpointing" : "without checkpointing");
    for (Model* m : {&quantized, &dequantized, &dense})
      for (const auto& t : m->trainable()) t.tensor.mutable_grad() = at::Tensor();
    const QuantizedStep a = adapted_step(quantized, input, probe, checkpoint);
    const QuantizedStep b = adapted_step(dequantized, input, probe, checkpoint);
    const QuantizedStep c = adapted_step(dense, input, probe, checkpoint);
    EXPECT_LT(scaled_diff(a.logits, b.logits), 1e-5);
    ASSERT_EQ(a.grads.size(), b.grads.size());
    for (size_t k = 0; k < a.grads.size(); ++k) EXPECT_LT(scaled_diff(a.grads[k], b.grads[k]), 1e-5) << k;
    // Quantisation error on these tiny random models (width 32): int8 within 2% of the logits' scale with gradients
    // pointing the same way (cosine > 0.999); NF4, 16 levels, within 30% (measured up to 17%) and cosine > 0.85
    // (measured down to 0.91).
    const double logit_error = (a.logits - c.logits).abs().max().item<double>() / c.logits.abs().max().item<double>();
    EXPECT_GT(logit_error, 0.0) << "quantisation changed nothing: was anything quantised?";
    EXPECT_LT(logit_error, format == QuantFormat::kInt8 ? 0.02 : 0.3);
    for (size_t k = 0; k < a.grads.size(); ++k)
      EXPECT_GT(cosine(a.grads[k], c.grads[k]), format == QuantFormat::kInt8 ? 0.999 : 0.85) << k;
  }
}

INSTANTIATE_TEST_SUITE_P(Layouts, QuantizedLayouts,
                         ::testing::Combine(::testing::Values("timm_script", "hf_trace", "torchvision_script"),
                                            ::testing::Values("int8", "nf4")),
                         [](const auto& info) {  // <layout>_<format>: filters can name a layout
                           return std::get<0>(info.param) + std::string("_") + std::get<1>(info.param);
                         });

// bf16 autocast: the quantised layers compute in bf16 like the dense ones, and gradients reach the adapters.
TEST(QuantizedModel, AutocastComputesInItsDtype) {
  const auto adapter_dir = fixture("models/adapter_timm_script");
  const auto ref = safetensors::read(fixture("models/ref_timm_script.safetensors")).tensors;
  Model model(load_bundle(fixture("models/timm_script.pt")));
  apply_adapter(model, load_adapter(adapter_dir), adapter_dir.string());
  model.to(c10::Device(c10::kCPU), at::kBFloat16, QuantFormat::kNf4);
  at::Tensor logits;
  {
    AutocastScope autocast(c10::Device(c10::kCPU), Precision::kBf16);
    logits = model.logits(ref.at("input"), true);
  }
  EXPECT_LT(scaled_diff(logits.to(at::kFloat), ref.at("adapted_logits")), 0.3);
  logits.sum().backward();
  for (const auto& t : model.adapters())
    for (const auto& tensor : t.tensors) EXPECT_TRUE(tensor.grad().defined() && tensor.grad().abs().sum().item<double>() > 0);
}

// DoRA reads the weight itself: the adapted layers keep dense weights (scripted nn.Linear types are per shape, so
// only qkv's), the others are quantised, and the step stays near the float64 DoRA reference.
TEST(QuantizedModel, DoraLayersStayDenseTheOthersAreQuantised) {
  const auto adapter_dir = fixture("models/adapter_timm_script_dora");
  const auto ref = safetensors::read(fixture("models/ref_timm_script_dora.safetensors")).tensors;
  Model model(load_bundle(fixture("models/timm_script.pt")));
  apply_adapter(model, load_adapter(adapter_dir), adapter_dir.string());
  model.to(c10::Device(c10::kCPU), at::kFloat, QuantFormat::kInt8);
  const FrozenQuantization& q = model.frozen_quantization();
  EXPECT_EQ(q.modules, 6);
  ASSERT_EQ(q.kept.size(), 2u);
  EXPECT_EQ(q.kept[0].rfind("model.blocks.0.attn.qkv (", 0), 0u) << q.kept[0];
  const at::Tensor logits = model.logits(ref.at("input"));
  EXPECT_LT(scaled_diff(logits, ref.at("adapted_logits")), 0.02);
  logits.sum().backward();
  for (const auto& t : model.adapters())
    for (const auto& tensor : t.tensors) EXPECT_TRUE(tensor.grad().defined());
}

// SSF scales and shifts the outputs of each adapted Linear, so the quantised weights stay quantised (the call
// replacing aten::linear is followed by the scale and shift) and the step stays near the float64 SSF reference.
TEST(QuantizedModel, SsfLayersAreQuantisedAndMatchTheReference) {
  const auto ref = safetensors::read(fixture("models/ref_timm_script_ssf.safetensors")).tensors;
  Model model(load_bundle(fixture("models/timm_script.pt")));
  LoraSettings settings;
  settings.variant = "ssf";
  auto targets = resolve_targets(model.module(), settings);
  init_adapter_tensors(targets, model.module());
  {
    at::NoGradGuard no_grad;
    for (auto& t : targets) {
      const std::string key = "ssf.base_model.model." + t.module.substr(model.bundle().info.module_prefix.size()) +
                              ".lora_ssf_scale." + t.slice + ".weight";
      t.tensors[0].copy_(ref.at(key));
      t.tensors[1].copy_(ref.at(std::string(key).replace(key.find("ssf_scale"), 9, "ssf_shift")));
    }
  }
  model.set_adapters(targets, settings);
  model.head().set(ref.at("head.weight").clone().requires_grad_(), ref.at("head.bias").clone().requires_grad_());
  model.to(c10::Device(c10::kCPU), at::kFloat, QuantFormat::kInt8);
  const FrozenQuantization& q = model.frozen_quantization();
  EXPECT_EQ(q.modules, 8);
  EXPECT_TRUE(q.kept.empty());
  const at::Tensor logits = model.logits(ref.at("input"));
  EXPECT_LT(scaled_diff(logits, ref.at("adapted_logits")), 0.02);
  logits.sum().backward();
  for (const auto& t : model.adapters())
    for (const auto& tensor : t.tensors) EXPECT_TRUE(tensor.grad().defined() && tensor.grad().abs().sum().item<double>() > 0);
}

}  // namespace
}  // namespace loratune
