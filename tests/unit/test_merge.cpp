// Merge: the merged TorchScript file gives the adapted model's logits. These tests also leave the merged files and
// the C++ logits in <fixtures>/merged for tests/python/check_merged.py, which loads them with torch.jit.load.
#include <ATen/core/grad_mode.h>
#include <gtest/gtest.h>

#include "loratune/adapter_binding.h"
#include "loratune/targets.h"
#include "loratune/errors.h"
#include "loratune/merge.h"
#include "loratune/model.h"
#include "loratune/safetensors.h"
#include "test_support.h"

namespace loratune {
namespace {

using test::fixture;
using test::max_abs_diff;

class MergeLayouts : public ::testing::TestWithParam<std::string> {};

TEST_P(MergeLayouts, MergedFileMatchesAdaptedModel) {
  const auto base = fixture("models/" + GetParam() + ".pt");
  const auto adapter = fixture("models/adapter_" + GetParam());
  const auto out_dir = fixture("merged");
  std::filesystem::create_directories(out_dir);
  const auto merged_path = out_dir / (GetParam() + ".pt");
  const MergeReport report = merge_adapter(base, adapter, merged_path, MergeOptions{});
  EXPECT_LT(report.max_abs_diff, 1e-5);
  EXPECT_EQ(report.merged.size(), 4u);

  // Logits of the unmerged adapted model in C++, for the Python check.
  const auto ref = safetensors::read(fixture("models/ref_" + GetParam() + ".safetensors")).tensors;
  Model adapted(load_bundle(base));
  apply_adapter(adapted, load_adapter(adapter), adapter.string());
  at::NoGradGuard no_grad;
  const at::Tensor logits = adapted.logits(ref.at("input"));
  safetensors::write(out_dir / (GetParam() + ".expected.safetensors"), {{"input", ref.at("input")}, {"logits", logits}});

  // Loaded back in C++: a classifier with the class names and preprocessing of the bundle.
  const Bundle merged = load_bundle(merged_path);
  EXPECT_EQ(merged.info.kind, "classifier");
  EXPECT_EQ(merged.info.classes.size(), 3u);
  EXPECT_EQ(merged.info.image_size, load_bundle(base).info.image_size);
  auto module = merged.module;
  EXPECT_LT(max_abs_diff(module.forward({ref.at("input")}).toTensor(), logits), 1e-5);
}

TEST_P(MergeLayouts, StrengthInterpolatesBetweenBaseAndAdapted) {
  const auto base = fixture("models/" + GetParam() + ".pt");
  const auto adapter = fixture("models/adapter_" + GetParam());
  const auto dir = test::temp_dir("strength_" + GetParam());
  const auto ref = safetensors::read(fixture("models/ref_" + GetParam() + ".safetensors")).tensors;
  MergeOptions zero;
  zero.strength = 0.0;
  merge_adapter(base, adapter, dir / "zero.pt", zero);
  auto m0 = load_bundle(dir / "zero.pt").module;
  const Adapter a = load_adapter(adapter);
  at::NoGradGuard no_grad;
  const at::Tensor base_logits = at::linear(ref.at("base_features"), a.head_weight, a.head_bias);
  EXPECT_LT(max_abs_diff(m0.forward({ref.at("input")}).toTensor(), base_logits), 1e-5);

  MergeOptions half;
  half.strength = 0.5;
  const auto report = merge_adapter(base, adapter, dir / "half.pt", half);
  EXPECT_LT(report.max_abs_diff, 1e-5);
  auto m5 = load_bundle(dir / "half.pt").module;
  const at::Tensor l5 = m5.forward({ref.at("input")}).toTensor();
  EXPECT_GT(max_abs_diff(l5, base_logits), 1e-3);
  EXPECT_GT(max_abs_diff(l5, ref.at("adapted_logits")), 1e-3);

  MergeOptions bad;
  bad.strength = 1.5;
  EXPECT_THROW_WITH(merge_adapter(base, adapter, dir / "bad.pt", bad), InputError, "merge strength must be between 0 and 1");
  EXPECT_FALSE(std::filesystem::exists(dir / "bad.pt"));
}

INSTANTIATE_TEST_SUITE_P(Layouts, MergeLayouts,
                         ::testing::Values("hf_script", "hf_trace", "timm_script", "timm_trace", "torchvision_script",
                                           "torchvision_trace", "mobileclip_trace"));

TEST(Merge, FeaturesOnlyWritesABackboneBundle) {
  const auto dir = test::temp_dir("features_only");
  MergeOptions o;
  o.features_only = true;
  const auto report = merge_adapter(fixture("models/timm_trace.pt"), fixture("models/adapter_timm_trace"), dir / "b.pt", o);
  EXPECT_LT(report.max_abs_diff, 1e-5);
  const Bundle b = load_bundle(dir / "b.pt");
  EXPECT_EQ(b.info.kind, "backbone");
  EXPECT_TRUE(b.has_block_structure());
  const auto ref = safetensors::read(fixture("models/ref_timm_trace.safetensors")).tensors;
  Model m(load_bundle(dir / "b.pt"));
  at::NoGradGuard no_grad;
  EXPECT_LT(max_abs_diff(m.features(ref.at("input")), ref.at("adapted_features")), 1e-5);
}

TEST(Merge, RefusesAdapterForAnotherBase) {
  const auto dir = test::temp_dir("merge_refuse");
  // Same architecture, other weights: caught by the fingerprint.
  {
    Bundle b = load_bundle(fixture("models/hf_script.pt"));
    Model m(load_bundle(fixture("models/hf_script.pt")));
    apply_adapter(m, load_adapter(fixture("models/adapter_hf_script")), "adapter");
    save_adapter(dir / "adapter", adapter_from_model(m, {"a", "b", "c"}, {}));
    {
      at::NoGradGuard no_grad;
      (*b.module.named_parameters().begin()).value.add_(1.0);
    }
    save_bundle(b.module, b.info, dir / "other.pt");
  }
  EXPECT_THROW_WITH(merge_adapter(dir / "other.pt", dir / "adapter", dir / "out.pt", MergeOptions{}), InputError,
                    (dir / "adapter").string() + " was trained on a different base model (adapter base fingerprint ");
  // Another architecture: the weights do not fit.
  EXPECT_THROW_WITH(merge_adapter(fixture("models/timm_script.pt"), dir / "adapter", dir / "out.pt", MergeOptions{}),
                    InputError, "was trained on a different base model");
  EXPECT_THROW_WITH(merge_adapter(fixture("models/timm_script.pt"), fixture("models/adapter_hf_script"), dir / "out.pt", MergeOptions{}),
                    InputError, "was made for another base: it adapts vit.encoder.layer.0.attention.attention.query");
  EXPECT_FALSE(std::filesystem::exists(dir / "out.pt"));
}

// Every Linear of every block, on every layout: the adapted graph and the merged file agree, and an adapter
// changes the output (each wiring was reached).
TEST(Merge, AllLinearTargetsOnEveryLayoutMergeToTheAdaptedModel) {
  for (const std::string layout :
       {"hf_script", "hf_trace", "timm_script", "timm_trace", "torchvision_script", "torchvision_trace", "mobileclip_trace"}) {
    SCOPED_TRACE(layout);
    const auto dir = test::temp_dir("all_linear_" + layout);
    torch::manual_seed(1);
    Model m(load_bundle(fixture("models/" + layout + ".pt")));
    LoraSettings settings;
    settings.targets = {"all-linear"};
    auto targets = resolve_targets(m.module(), settings, m.bundle().info.blocks);
    EXPECT_GE(targets.size(), 4u);
    init_adapter_tensors(targets, m.module());
    {
      at::NoGradGuard no_grad;
      for (auto& t : targets) t.B().normal_(0, 0.05);
    }
    m.set_adapters(targets, settings);
    m.head().init(3);
    const at::Tensor x = at::randn({2, 3, m.bundle().info.image_size, m.bundle().info.image_size});
    at::Tensor adapted, base;
    {
      at::NoGradGuard no_grad;
      adapted = m.logits(x);
      m.clear_adapters();
      base = m.logits(x);
    }
    EXPECT_GT(test::max_abs_diff(adapted, base), 1e-3);
    m.set_adapters(targets, settings);
    save_adapter(dir / "adapter", adapter_from_model(m, {"a", "b", "c"}, {}));
    const MergeReport r = merge_adapter(fixture("models/" + layout + ".pt"), dir / "adapter", dir / "merged.pt", MergeOptions{});
    EXPECT_LT(r.max_abs_diff, 1e-5);
  }
}

TEST(Adapters, SaveLoadRoundTripIsExactAndPeftShaped) {
  const auto dir = test::temp_dir("adapter_roundtrip");
  Model m(load_bundle(fixture("models/timm_script.pt")));
  apply_adapter(m, load_adapter(fixture("models/adapter_timm_script")), "fixture");
  const std::vector<std::string> classes = {"고양이", "개", "새"};
  save_adapter(dir / "a", adapter_from_model(m, classes, {{"lr", 0.001}}));
  EXPECT_TRUE(std::filesystem::exists(dir / "a" / "adapter_config.json"));
  const auto st = safetensors::read(dir / "a" / "adapter_model.safetensors");
  EXPECT_TRUE(st.tensors.count("base_model.model.blocks.0.attn.qkv.lora_A.q.weight"));
  EXPECT_TRUE(st.tensors.count("base_model.model.blocks.1.attn.qkv.lora_B.v.weight"));
  EXPECT_TRUE(st.tensors.count("base_model.model.classifier.weight"));
  EXPECT_EQ(st.metadata.at("format"), "loratune.adapter/1");
  const Adapter back = load_adapter(dir / "a" / "adapter_model.safetensors");
  EXPECT_EQ(back.classes, classes);
  EXPECT_EQ(back.base_fingerprint, m.bundle().fingerprint);
  EXPECT_EQ(back.training["lr"], 0.001);
  ASSERT_EQ(back.targets.size(), 4u);
  for (size_t i = 0; i < back.targets.size(); ++i) {
    EXPECT_EQ(back.targets[i].module, "blocks." + std::to_string(i / 2) + ".attn.qkv");
    EXPECT_TRUE(at::equal(back.targets[i].B(), m.adapters()[i].B()));
  }
}

}  // namespace
}  // namespace loratune
