// LoRA, DoRA and SSF on every layout and export mode, compared with eager PyTorch in float64 on the same weights and
// inputs (tests/fixtures/reference.py computes W + s*B@A, m * (W + s*B@A) / ||W + s*B@A|| for DoRA, the scaled
// and shifted outputs of SSF, and the PiSSA and OLoRA starts as PEFT does).
#include <ATen/core/grad_mode.h>
#include <gtest/gtest.h>

#include "loratune/adapter.h"
#include "loratune/adapter_init.h"
#include "loratune/adapter_binding.h"
#include "loratune/adapter_variant.h"
#include "loratune/targets.h"
#include "loratune/errors.h"
#include "loratune/merge.h"
#include "loratune/model.h"
#include "loratune/optim.h"
#include "loratune/safetensors.h"
#include "test_support.h"

namespace loratune {
namespace {

using test::fixture;
using test::scaled_diff;

class LoraReference : public ::testing::TestWithParam<std::string> {
 protected:
  std::filesystem::path bundle_path() const { return fixture("models/" + GetParam() + ".pt"); }
  std::filesystem::path adapter_path() const { return fixture("models/adapter_" + GetParam()); }
  safetensors::Tensors reference() const { return safetensors::read(fixture("models/ref_" + GetParam() + ".safetensors")).tensors; }
};

// PEFT key of an adapter tensor, as the reference names its gradients.
std::string peft_key(const LoraTarget& t, const std::string& prefix, const std::string& tensor) {
  return "base_model.model." + t.module.substr(prefix.size()) + (t.param == "weight" ? "" : "." + t.param) + ".lora_" +
         tensor + (t.slice.empty() ? "" : "." + t.slice) + ".weight";
}

TEST_P(LoraReference, BaseOutputMatchesPython) {
  Model model(load_bundle(bundle_path()));
  const auto ref = reference();
  at::NoGradGuard no_grad;
  EXPECT_LT(scaled_diff(model.features(ref.at("input")), ref.at("base_features")), 1e-5);
}

TEST_P(LoraReference, AdaptedAtInitEqualsBaseExactly) {
  const auto ref = reference();
  at::Tensor base;
  {
    Model plain(load_bundle(bundle_path()));
    at::NoGradGuard no_grad;
    base = plain.features(ref.at("input"));
  }
  Model model(load_bundle(bundle_path()));
  auto targets = resolve_targets(model.module(), LoraSettings{});
  ASSERT_EQ(targets.size(), 4u);  // q and v in each of 2 blocks
  init_adapter_tensors(targets, model.module());
  model.set_adapters(targets, LoraSettings{});
  at::NoGradGuard no_grad;
  EXPECT_TRUE(at::equal(model.features(ref.at("input")), base));
}

// The adapter of `adapter_dir` on the bundle, with and without checkpointing: logits and the gradients of every
// adapter tensor and the head equal the float64 reference `ref`.
void expect_matches_reference(const std::filesystem::path& bundle, const std::filesystem::path& adapter_dir,
                              const safetensors::Tensors& ref, const std::string& variant) {
  for (bool checkpoint : {false, true}) {
    SCOPED_TRACE(checkpoint ? "with checkpointing" : "without checkpointing");
    Model model(load_bundle(bundle));
    apply_adapter(model, load_adapter(adapter_dir), adapter_dir.string());
    ASSERT_EQ(model.adapters().size(), 4u);
    const at::Tensor logits = model.logits(ref.at("input"), checkpoint);
    EXPECT_LT(scaled_diff(logits, ref.at("adapted_logits")), 1e-5);
    (logits * ref.at("probe")).sum().backward();
    const std::string& prefix = model.bundle().info.module_prefix;
    for (const auto& t : model.adapters()) {
      SCOPED_TRACE(t.describe());
      ASSERT_EQ(t.variant->name(), variant);
      const auto& specs = t.variant->tensor_specs();
      for (size_t k = 0; k < specs.size(); ++k) {
        ASSERT_TRUE(t.tensors[k].grad().defined()) << specs[k].name;
        EXPECT_LT(scaled_diff(t.tensors[k].grad(), ref.at("grad." + peft_key(t, prefix, specs[k].name))), 1e-5)
            << specs[k].name;
      }
    }
    EXPECT_LT(scaled_diff(model.head().weight().grad(), ref.at("grad.head.weight")), 1e-5);
    EXPECT_LT(scaled_diff(model.head().bias().grad(), ref.at("grad.head.bias")), 1e-5);
    for (const auto& p : model.module().parameters()) EXPECT_FALSE(p.grad().defined());
  }
}

TEST_P(LoraReference, ForwardAndGradientsMatchPython) {
  expect_matches_reference(bundle_path(), adapter_path(), reference(), "lora");
}

// DoRA against the float64 reference (the same layouts; magnitude moved off the row norms so that it matters).
TEST_P(LoraReference, DoraForwardAndGradientsMatchPython) {
  const auto ref = safetensors::read(fixture("models/ref_" + GetParam() + "_dora.safetensors")).tensors;
  const auto adapter_dir = fixture("models/adapter_" + GetParam() + "_dora");
  ASSERT_EQ(load_adapter(adapter_dir).lora.variant, "dora");
  expect_matches_reference(bundle_path(), adapter_dir, ref, "dora");
}

// SSF against the float64 reference, with and without checkpointing; its file (loratune's own, no PEFT config) gives
// the same logits, and merge folds scale and shift into the weight and bias: the merged file gives the reference
// logits, and at strength 0 the base's. The MobileCLIP stage's qkv has no bias to take the shift: refused.
TEST_P(LoraReference, SsfForwardGradientsFileAndMergeMatchPython) {
  LoraSettings settings;
  settings.variant = "ssf";
  if (GetParam() == "mobileclip_trace") {
    Model model(load_bundle(bundle_path()));
    auto targets = resolve_targets(model.module(), settings);
    init_adapter_tensors(targets, model.module());
    EXPECT_THROW_WITH(model.set_adapters(targets, settings), InputError,
                      "lora.variant ssf cannot adapt image_encoder.model.network.7.0.token_mixer.qkv: it has no bias");
    return;
  }
  const auto ref = safetensors::read(fixture("models/ref_" + GetParam() + "_ssf.safetensors")).tensors;
  auto adapted_model = [&] {
    auto model = std::make_unique<Model>(load_bundle(bundle_path()));
    auto targets = resolve_targets(model->module(), settings);
    init_adapter_tensors(targets, model->module());
    const std::string& prefix = model->bundle().info.module_prefix;
    {
      at::NoGradGuard no_grad;
      for (auto& t : targets)
        for (size_t k = 0; k < t.tensors.size(); ++k)
          t.tensors[k].copy_(ref.at("ssf." + peft_key(t, prefix, t.variant->tensor_specs()[k].name)));
    }
    model->set_adapters(targets, settings);
    model->head().set(ref.at("head.weight").clone().requires_grad_(), ref.at("head.bias").clone().requires_grad_());
    return model;
  };
  for (bool checkpoint : {false, true}) {
    SCOPED_TRACE(checkpoint ? "with checkpointing" : "without checkpointing");
    auto model = adapted_model();
    ASSERT_EQ(model->adapters().size(), 4u);
    const at::Tensor logits = model->logits(ref.at("input"), checkpoint);
    EXPECT_LT(scaled_diff(logits, ref.at("adapted_logits")), 1e-5);
    (logits * ref.at("probe")).sum().backward();
    const std::string& prefix = model->bundle().info.module_prefix;
    for (const auto& t : model->adapters()) {
      SCOPED_TRACE(t.describe());
      for (size_t k = 0; k < t.tensors.size(); ++k) {
        const std::string name = t.variant->tensor_specs()[k].name;
        ASSERT_TRUE(t.tensors[k].grad().defined()) << name;
        EXPECT_LT(scaled_diff(t.tensors[k].grad(), ref.at("grad." + peft_key(t, prefix, name))), 1e-5) << name;
      }
    }
    EXPECT_LT(scaled_diff(model->head().weight().grad(), ref.at("grad.head.weight")), 1e-5);
    for (const auto& p : model->module().parameters()) EXPECT_FALSE(p.grad().defined());
  }

  const auto dir = test::temp_dir("ssf_" + GetParam());
  save_adapter(dir / "adapter", adapter_from_model(*adapted_model(), {"a", "b", "c"}, nlohmann::json::object()));
  EXPECT_FALSE(std::filesystem::exists(dir / "adapter" / "adapter_config.json"));
  const Adapter file = load_adapter(dir / "adapter");
  EXPECT_EQ(file.lora.variant, "ssf");
  Model applied(load_bundle(bundle_path()));
  apply_adapter(applied, file, "ssf file");
  at::NoGradGuard no_grad;
  const at::Tensor x = ref.at("input");
  EXPECT_LT(scaled_diff(applied.logits(x), ref.at("adapted_logits")), 1e-5);
  EXPECT_LT(merge_adapter(bundle_path(), dir / "adapter", dir / "merged.pt", MergeOptions{}).max_abs_diff, 1e-5);
  EXPECT_LT(scaled_diff(load_bundle(dir / "merged.pt").module.forward({x}).toTensor(), ref.at("adapted_logits")), 1e-5);
  MergeOptions zero;
  zero.strength = 0.0;
  merge_adapter(bundle_path(), dir / "adapter", dir / "zero.pt", zero);
  Model plain(load_bundle(bundle_path()));
  const at::Tensor base = at::linear(plain.features(x), ref.at("head.weight"), ref.at("head.bias"));
  EXPECT_LT(scaled_diff(load_bundle(dir / "zero.pt").module.forward({x}).toTensor(), base), 1e-5);
}

// VPT on `bundle`, shallow and deep, against its float64 reference `ref`, which puts the prompts after the class token
// as the paper does (loratune appends them: blocks treat tokens as a set), with and without checkpointing; the file
// and the merged model (prompts inside) give the same logits.
void expect_vpt_matches_reference(const std::filesystem::path& bundle, const safetensors::Tensors& ref,
                                  const std::string& name) {
  const at::Tensor x = ref.at("input");
  for (const bool deep : {false, true}) {
    const std::string kind = deep ? "deep" : "shallow";
    SCOPED_TRACE(kind);
    const PromptSettings settings{3, deep};
    auto prompted = [&] {
      auto model = std::make_unique<Model>(load_bundle(bundle));
      model->set_method(Method::kVpt);
      std::vector<at::Tensor> sets;
      for (int64_t i = 0; i < (deep ? model->blocks().size() : 1); ++i)
        sets.push_back(ref.at(kind + ".prompts." + std::to_string(i)));
      model->set_prompts(settings, sets, "reference");
      model->head().set(ref.at("head.weight").clone().requires_grad_(), ref.at("head.bias").clone().requires_grad_());
      return model;
    };
    for (const bool checkpoint : {false, true}) {
      SCOPED_TRACE(checkpoint ? "with checkpointing" : "without checkpointing");
      auto model = prompted();
      EXPECT_EQ(model->blocks().frozen_prefix(), 0);
      const at::Tensor logits = model->logits(x, checkpoint);
      EXPECT_LT(scaled_diff(logits, ref.at(kind + ".adapted_logits")), 1e-5);
      (logits * ref.at("probe")).sum().backward();
      const auto& sets = model->prompts().sets();
      ASSERT_EQ(sets.size(), deep ? 2u : 1u);
      for (size_t i = 0; i < sets.size(); ++i) {
        ASSERT_TRUE(sets[i].grad().defined()) << i;
        EXPECT_LT(scaled_diff(sets[i].grad(), ref.at(kind + ".grad.prompts." + std::to_string(i))), 1e-5) << i;
      }
      EXPECT_LT(scaled_diff(model->head().weight().grad(), ref.at(kind + ".grad.head.weight")), 1e-5);
      for (const auto& p : model->module().parameters()) EXPECT_FALSE(p.grad().defined());
      EXPECT_EQ(model->trainable().size(), sets.size() + 2);
    }
    const auto dir = test::temp_dir("vpt_" + name) / kind;
    save_adapter(dir / "adapter", adapter_from_model(*prompted(), {"a", "b", "c"}, nlohmann::json::object()));
    EXPECT_FALSE(std::filesystem::exists(dir / "adapter" / "adapter_config.json"));
    const Adapter file = load_adapter(dir / "adapter");
    EXPECT_EQ(file.method, Method::kVpt);
    EXPECT_EQ(file.vpt.deep, deep);
    Model applied(load_bundle(bundle));
    apply_adapter(applied, file, "vpt file");
    at::NoGradGuard no_grad;
    EXPECT_LT(scaled_diff(applied.logits(x), ref.at(kind + ".adapted_logits")), 1e-5);
    EXPECT_LT(merge_adapter(bundle, dir / "adapter", dir / "merged.pt", MergeOptions{}).max_abs_diff, 1e-5);
    const Bundle merged = load_bundle(dir / "merged.pt");
    EXPECT_TRUE(merged.info.blocks.empty()) << "the prompts live in the merged forward";
    auto merged_module = merged.module;
    EXPECT_LT(scaled_diff(merged_module.forward({x}).toTensor(), ref.at(kind + ".adapted_logits")), 1e-5);
    MergeOptions half;
    half.strength = 0.5;
    EXPECT_THROW_WITH(merge_adapter(bundle, dir / "adapter", dir / "half.pt", half), InputError,
                      "is method vpt, whose prompt tokens go in whole: leave --strength at 1");
  }
}

// Every layout; MobileCLIP's stages see 4-D maps: refused.
TEST_P(LoraReference, VptForwardGradientsFileAndMergeMatchPython) {
  if (GetParam() == "mobileclip_trace") {
    Model model(load_bundle(bundle_path()));
    EXPECT_THROW_WITH(model.init_prompts(PromptSettings{}), InputError,
                      "method vpt joins prompt tokens to the blocks' tokens, but the blocks of mobileclip_trace.pt take 4-D");
    return;
  }
  expect_vpt_matches_reference(bundle_path(), safetensors::read(fixture("models/ref_" + GetParam() + "_vpt.safetensors")).tensors,
                               GetParam());
}

// Blocks that see [tokens, batch, width] (open_clip before batch_first, OpenAI's CLIP): prompts join along the first
// dimension.
TEST(Vpt, SequenceFirstBlocksMatchPython) {
  const auto bundle = fixture("models/seqfirst_script.pt");
  EXPECT_EQ(token_layout(load_bundle(bundle)).sequence_dim, 0);
  expect_vpt_matches_reference(bundle, safetensors::read(fixture("models/ref_seqfirst_script_vpt.safetensors")).tensors,
                               "seqfirst");
}

// AdaptFormer (`settings`) on `bundle` against its float64 reference `ref` (hooks on the Python modules: the
// LayerNorm's input x' or, sequential, the MLP's output; the MLP's output plus s * Up(ReLU(Down(.)))), with and without
// checkpointing; the file and the merged model (adapters inside, the rewritten blocks saved with them) give the same
// logits, and cleared adapters give the base.
void expect_adaptformer_matches_reference(const std::filesystem::path& bundle, const safetensors::Tensors& ref,
                                          const AdaptFormerSettings& settings, const std::string& name) {
  const at::Tensor x = ref.at("input");
  const auto& names = adaptformer_tensor_names();
  auto adapted = [&] {
    auto model = std::make_unique<Model>(load_bundle(bundle));
    model->set_method(Method::kAdaptFormer);
    std::vector<std::vector<at::Tensor>> tensors(static_cast<size_t>(model->blocks().size()));
    for (size_t i = 0; i < tensors.size(); ++i)
      for (const auto& tensor : names) tensors[i].push_back(ref.at("adaptformer." + std::to_string(i) + "." + tensor));
    model->set_mlp_adapters(settings, tensors, "reference");
    model->head().set(ref.at("head.weight").clone().requires_grad_(), ref.at("head.bias").clone().requires_grad_());
    return model;
  };
  for (const bool checkpoint : {false, true}) {
    SCOPED_TRACE(checkpoint ? "with checkpointing" : "without checkpointing");
    auto model = adapted();
    EXPECT_EQ(model->blocks().frozen_prefix(), 0);
    const at::Tensor logits = model->logits(x, checkpoint);
    EXPECT_LT(scaled_diff(logits, ref.at("adapted_logits")), 1e-5);
    (logits * ref.at("probe")).sum().backward();
    const auto& tensors = model->mlp_adapters().tensors();
    for (size_t i = 0; i < tensors.size(); ++i)
      for (size_t k = 0; k < names.size(); ++k) {
        const std::string key = "adaptformer." + std::to_string(i) + "." + names[k];
        ASSERT_TRUE(tensors[i][k].grad().defined()) << key;
        EXPECT_LT(scaled_diff(tensors[i][k].grad(), ref.at("grad." + key)), 1e-5) << key;
      }
    EXPECT_LT(scaled_diff(model->head().weight().grad(), ref.at("grad.head.weight")), 1e-5);
    for (const auto& p : model->module().parameters()) EXPECT_FALSE(p.grad().defined());
    EXPECT_EQ(model->trainable().size(), 4 * tensors.size() + 2);
  }
  const auto dir = test::temp_dir("adaptformer_" + name);
  save_adapter(dir / "adapter", adapter_from_model(*adapted(), {"a", "b", "c"}, nlohmann::json::object()));
  EXPECT_FALSE(std::filesystem::exists(dir / "adapter" / "adapter_config.json"));
  const Adapter file = load_adapter(dir / "adapter");
  EXPECT_EQ(file.method, Method::kAdaptFormer);
  EXPECT_EQ(file.adaptformer.sequential, settings.sequential);
  Model applied(load_bundle(bundle));
  apply_adapter(applied, file, "adaptformer file");
  at::NoGradGuard no_grad;
  EXPECT_LT(scaled_diff(applied.logits(x), ref.at("adapted_logits")), 1e-5);
  applied.clear_mlp_adapters();
  Model plain(load_bundle(bundle));
  EXPECT_TRUE(at::equal(applied.features(x), plain.features(x))) << "cleared: the base again";
  EXPECT_LT(merge_adapter(bundle, dir / "adapter", dir / "merged.pt", MergeOptions{}).max_abs_diff, 1e-5);
  auto merged = load_bundle(dir / "merged.pt").module;
  EXPECT_LT(scaled_diff(merged.forward({x}).toTensor(), ref.at("adapted_logits")), 1e-5);
}

// Both forms on every layout. MobileCLIP's stages see 4-D maps: refused; transformers' ViTOutput adds the residual
// inside, so the sequential form (which reads the MLP's output) is refused there.
TEST_P(LoraReference, AdaptFormerForwardGradientsFileAndMergeMatchPython) {
  for (const bool sequential : {false, true}) {
    SCOPED_TRACE(sequential ? "sequential" : "parallel");
    const AdaptFormerSettings settings{4, 0.5, sequential};
    if (GetParam() == "mobileclip_trace") {
      Model model(load_bundle(bundle_path()));
      EXPECT_THROW_WITH(model.init_mlp_adapters(settings), InputError,
                        "method adaptformer adapts the blocks' tokens, but the blocks of mobileclip_trace.pt take 4-D");
      continue;
    }
    if (sequential && GetParam().rfind("hf_", 0) == 0) {
      Model model(load_bundle(bundle_path()));
      EXPECT_THROW_WITH(model.init_mlp_adapters(settings), InputError,
                        "adds the residual inside its `output` module; use the parallel form");
      continue;
    }
    const std::string form = sequential ? "_sequential" : "";
    expect_adaptformer_matches_reference(
        bundle_path(), safetensors::read(fixture("models/ref_" + GetParam() + "_adaptformer" + form + ".safetensors")).tensors,
        settings, GetParam() + form);
  }
}

// LoRA-FA against the LoRA reference (its forward is LoRA's): B's gradient is Python's, A is fixed (no gradient, not
// trained); one AdamW step with weight decay moves B as AdamW moves it on Python's gradient and leaves A bit-identical.
TEST_P(LoraReference, LoraFaTrainsOnlyBAgainstPython) {
  const auto ref = reference();
  Adapter adapter = load_adapter(adapter_path());
  adapter.lora.variant = "lora_fa";
  for (auto& t : adapter.targets) t.variant = &variant_by_name("lora_fa");
  Model model(load_bundle(bundle_path()));
  apply_adapter(model, adapter, "lora_fa");
  std::vector<at::Tensor> a_before, b_before;
  for (const auto& t : model.adapters()) {
    a_before.push_back(t.tensors[0].detach().clone());
    b_before.push_back(t.tensors[1].detach().clone());
  }
  const auto trainable = model.trainable();
  EXPECT_EQ(trainable.size(), model.adapters().size() + 2) << "every B and the head, no A";
  for (const auto& n : trainable) EXPECT_EQ(n.name.find(".A"), std::string::npos) << n.name;

  const at::Tensor logits = model.logits(ref.at("input"));
  EXPECT_LT(scaled_diff(logits, ref.at("adapted_logits")), 1e-5);
  (logits * ref.at("probe")).sum().backward();
  const double lr = 0.01, decay = 0.1;
  AdamW optimizer(trainable, AdamWOptions{0.9, 0.999, 1e-8, decay});
  optimizer.step(lr);
  const std::string& prefix = model.bundle().info.module_prefix;
  for (size_t i = 0; i < model.adapters().size(); ++i) {
    const auto& t = model.adapters()[i];
    SCOPED_TRACE(t.describe());
    EXPECT_FALSE(t.tensors[0].grad().defined());
    EXPECT_TRUE(at::equal(t.tensors[0], a_before[i])) << "A is fixed";
    // AdamW's first step: decoupled decay, then lr * g / (|g| + eps) (bias corrections cancel).
    const at::Tensor g = ref.at("grad." + peft_key(t, prefix, "B")).to(at::kDouble);
    const at::Tensor expected = b_before[i].to(at::kDouble) * (1 - lr * decay) - lr * g / (g.abs() + 1e-8);
    const at::Tensor clear = g.abs() > 1e-3 * g.abs().max();  // where float rounding cannot flip the step's sign
    const at::Tensor error = (t.tensors[1].detach().to(at::kDouble) - expected).abs();
    EXPECT_LT(error.masked_select(clear).max().item<double>(), 1e-5);
    EXPECT_LE(error.max().item<double>(), 2 * lr + 1e-6);
  }
}

TEST_P(LoraReference, OnlyAdaptersAndHeadTrainAndLossFalls) {
  const auto ref = reference();
  torch::manual_seed(0);
  Model model(load_bundle(bundle_path()));
  auto targets = resolve_targets(model.module(), LoraSettings{});
  init_adapter_tensors(targets, model.module());
  model.set_adapters(targets, LoraSettings{});
  model.head().init(3);
  const at::Tensor x = ref.at("input");
  const at::Tensor labels = at::tensor({0, 2}, at::kLong);
  auto loss_now = [&] { return at::cross_entropy_loss(model.logits(x), labels); };

  at::Tensor first = loss_now();
  first.backward();
  for (const auto& t : model.adapters()) {
    EXPECT_EQ(t.A().grad().abs().max().item<float>(), 0.0f) << "B = 0 at init, so grad(A) = 0";
    EXPECT_GT(t.B().grad().abs().max().item<float>(), 0.0f);
  }
  for (const auto& p : model.module().parameters()) EXPECT_FALSE(p.grad().defined());
  const double initial = first.item<double>();
  AdamW optimizer(model.trainable(), AdamWOptions{});
  for (int step = 0; step < 15; ++step) {
    optimizer.step(0.05);
    optimizer.zero_grad();
    loss_now().backward();
  }
  EXPECT_LT(loss_now().item<double>(), 0.5 * initial);
}

// Settings of the reference starts (tests/fixtures/reference.py: RANK 4, ALPHA 8) on each layout's q and v.
LoraSettings start_settings(const std::string& start) {
  LoraSettings s;
  s.rank = 4;
  s.alpha = 8.0;
  s.init = start;
  return s;
}

// `a` with each of its rank components (row k of A, column k of B) signed as in `like`: singular and QR factors are
// defined up to those signs.
at::Tensor signed_like(const at::Tensor& a, const at::Tensor& like, int64_t component_dim) {
  const at::Tensor dots = (a.to(at::kDouble) * like.to(at::kDouble)).sum(1 - component_dim, true);
  return a.to(at::kDouble) * at::where(dots < 0, -1.0, 1.0);
}

// PiSSA and OLoRA against PEFT's pissa_init / olora_init in float64: A0, B0 (up to the sign of each component) and
// the rows left in the frozen weight; the adapted model starts as the base.
TEST_P(LoraReference, StartsTakenFromTheWeightMatchPeft) {
  const auto ref = safetensors::read(fixture("models/ref_" + GetParam() + "_init.safetensors")).tensors;
  const auto base = reference().at("base_features");
  for (const std::string start : {"pissa", "olora"}) {
    SCOPED_TRACE(start);
    Model model(load_bundle(bundle_path()));
    const LoraSettings settings = start_settings(start);
    auto targets = resolve_targets(model.module(), settings);
    init_adapter_tensors(targets, model.module(), adapter_init_by_name(start));
    const std::string& prefix = model.bundle().info.module_prefix;
    auto weight_of = [&](const LoraTarget& t) {
      for (const auto& p : model.module().named_parameters())
        if (p.name == t.module + "." + t.param) return p.value;
      throw std::runtime_error("no weight " + t.module);
    };
    for (const auto& t : targets) {
      SCOPED_TRACE(t.describe());
      const at::Tensor a = ref.at(start + "." + peft_key(t, prefix, "A")), b = ref.at(start + "." + peft_key(t, prefix, "B"));
      EXPECT_LT(scaled_diff(signed_like(t.A(), a, 0), a), 1e-4);
      EXPECT_LT(scaled_diff(signed_like(t.B(), b, 1), b), 1e-4);
      EXPECT_TRUE(t.A().requires_grad() && t.B().requires_grad());
      EXPECT_TRUE(at::equal(t.taken_A, t.A()) && at::equal(t.taken_B, t.B()));
      const at::Tensor rows = weight_of(t).narrow(0, t.row_begin, t.rows);
      EXPECT_LT(scaled_diff(rows, ref.at(start + "." + peft_key(t, prefix, "rows"))), 1e-5);
    }
    model.set_adapters(targets, settings);
    at::NoGradGuard no_grad;
    EXPECT_LT(scaled_diff(model.features(reference().at("input")), base), 1e-5);
  }
}

// What training changed from such a start, saved and applied to the unmodified base, gives the trained model's
// logits: the file holds [A; A0] and [B, -B0] at rank 2r with alpha keeping the scale (PEFT's conversion), for LoRA
// and DoRA, with and without rsLoRA.
TEST_P(LoraReference, TakenStartsAreGivenBackInTheFile) {
  const at::Tensor x = reference().at("input");
  for (const std::string variant : {"lora", "dora"})
    for (const bool rslora : {false, true}) {
      SCOPED_TRACE(variant + (rslora ? " rslora" : ""));
      torch::manual_seed(3);
      Model trained(load_bundle(bundle_path()));
      LoraSettings settings = start_settings("pissa");
      settings.variant = variant;
      settings.rslora = rslora;
      settings.dropout = 0.0;
      auto targets = resolve_targets(trained.module(), settings);
      init_adapter_tensors(targets, trained.module(), adapter_init_by_name("pissa"));
      {
        at::NoGradGuard no_grad;
        for (auto& t : targets)
          for (auto& tensor : t.tensors) tensor.add_(at::randn_like(tensor) * 0.05 * tensor.abs().mean());
      }
      trained.set_adapters(targets, settings);
      trained.head().init(3);
      at::Tensor expected;
      {
        at::NoGradGuard no_grad;
        expected = trained.logits(x);
      }
      const auto dir = test::temp_dir("taken_start") / (variant + (rslora ? "_rs" : ""));
      save_adapter(dir, adapter_from_model(trained, {"a", "b", "c"}, nlohmann::json::object()));
      const Adapter file = load_adapter(dir);
      EXPECT_EQ(file.lora.rank, 8);
      EXPECT_DOUBLE_EQ(file.lora.alpha, rslora ? 8.0 * std::sqrt(2.0) : 16.0);
      EXPECT_EQ(file.lora.init, "pissa");
      for (const auto& t : file.targets) EXPECT_DOUBLE_EQ(t.scale(), targets.front().scale());
      Model applied(load_bundle(bundle_path()));
      apply_adapter(applied, file, dir.string());
      at::NoGradGuard no_grad;
      EXPECT_LT(scaled_diff(applied.logits(x), expected), 1e-5);
    }
}

INSTANTIATE_TEST_SUITE_P(Layouts, LoraReference,
                         ::testing::Values("hf_script", "hf_trace", "timm_script", "timm_trace", "torchvision_script",
                                           "torchvision_trace", "mobileclip_trace"));

TEST(LoraTargets, DefaultTargetsPerLayout) {
  Model hf(load_bundle(fixture("models/hf_script.pt")));
  auto t = resolve_targets(hf.module(), LoraSettings{});
  EXPECT_EQ(t[0].module, "vit.encoder.layer.0.attention.attention.query");
  EXPECT_EQ(t[0].slice, "");
  Model timm(load_bundle(fixture("models/timm_trace.pt")));
  t = resolve_targets(timm.module(), LoraSettings{});
  EXPECT_EQ(t[0].module, "model.blocks.0.attn.qkv");
  EXPECT_EQ(t[0].slice, "q");
  EXPECT_EQ(t[1].slice, "v");
  EXPECT_EQ(t[1].row_begin, 64);
  EXPECT_EQ(t[1].rows, 32);
  Model tv(load_bundle(fixture("models/torchvision_script.pt")));
  t = resolve_targets(tv.module(), LoraSettings{});
  EXPECT_EQ(t[0].param, "in_proj_weight");
}

TEST(LoraTargets, PatternsSlicesAndOverrides) {
  Model timm(load_bundle(fixture("models/timm_script.pt")));
  LoraSettings s;
  s.targets = {"qkv:q,k,v", "fc1"};
  s.rank_pattern = {{"blocks.1.attn.qkv:v", 2}};
  s.alpha_pattern = {{"fc1", 4.0}};
  s.rslora = true;
  const auto t = resolve_targets(timm.module(), s);
  ASSERT_EQ(t.size(), 8u);  // 2 blocks x (q, k, v, fc1)
  for (const auto& target : t) {
    const bool overridden = target.module == "model.blocks.1.attn.qkv" && target.slice == "v";
    EXPECT_EQ(target.rank, overridden ? 2 : 8) << target.describe();
    EXPECT_DOUBLE_EQ(target.alpha, target.module.find("fc1") != std::string::npos ? 4.0 : 16.0);
    EXPECT_DOUBLE_EQ(target.scale(), target.alpha / std::sqrt(static_cast<double>(target.rank)));
  }
  s = LoraSettings{};
  s.targets = {"re:model\\.blocks\\.0\\..*qkv:v"};
  const auto only = resolve_targets(timm.module(), s);
  ASSERT_EQ(only.size(), 1u);
  EXPECT_EQ(only[0].module, "model.blocks.0.attn.qkv");
}

TEST(LoraTargets, ErrorsSayWhatWouldWork) {
  Model hf(load_bundle(fixture("models/hf_script.pt")));
  LoraSettings s;
  s.targets = {"qeury"};
  EXPECT_THROW_WITH(resolve_targets(hf.module(), s), InputError,
                    "LoRA target \"qeury\" matches no module (did you mean \"query\"?). Candidates: ");
  s.targets = {"query:q,v"};
  EXPECT_THROW_WITH(resolve_targets(hf.module(), s), InputError, "asks for q/k/v slices, but");
  s.targets = {"query"};
  s.rank = 64;
  EXPECT_THROW_WITH(resolve_targets(hf.module(), s), InputError, "LoRA rank 64 is larger than the weight");
}

// What the file format, `info`, the config and the optimiser ask a variant agrees with the tensors it makes.
TEST(AdapterVariants, SpecsDescribeTheTensorsEachVariantMakes) {
  Model model(load_bundle(fixture("models/timm_script.pt")));  // fused qkv: slices and whole weights
  ASSERT_GE(adapter_variants().size(), 2u);
  for (const AdapterVariant* variant : adapter_variants()) {
    SCOPED_TRACE(variant->name());
    EXPECT_EQ(find_variant(variant->name()), variant);
    LoraSettings settings;
    settings.variant = variant->name();
    settings.rank = 3;
    settings.targets = {"qkv:q,v", "fc1"};
    auto targets = resolve_targets(model.module(), settings);
    init_adapter_tensors(targets, model.module());
    ASSERT_FALSE(targets.empty());
    const auto& specs = variant->tensor_specs();
    for (const auto& t : targets) {
      ASSERT_EQ(t.variant, variant);
      ASSERT_EQ(t.tensors.size(), specs.size());
      int64_t made = 0;
      for (size_t k = 0; k < specs.size(); ++k) {
        EXPECT_EQ(t.tensors[k].sizes(), at::IntArrayRef(specs[k].shape_for(t))) << specs[k].name;
        EXPECT_EQ(t.tensor_name(k), "lora." + t.name() + "." + specs[k].name);
        made += t.tensors[k].numel();
      }
      EXPECT_EQ(variant->parameter_count(t), made);
      EXPECT_NO_THROW(variant->check(t, "f"));
      LoraTarget missing = t;
      missing.tensors.back() = at::Tensor();
      EXPECT_THROW_WITH(variant->check(missing, "f"), InputError, "f: adapter " + t.describe() +
                        " has no lora_" + specs.back().name);
    }
  }
  EXPECT_EQ(find_variant("vera"), nullptr);
  EXPECT_THROW_WITH(variant_by_name("vera"), InputError, "lora.variant must be lora, dora, lora_fa or ssf (got \"vera\")");
}

// The starts that draw A: PEFT's default (uniform in +-1/sqrt(in)) and Gaussian (std 1/r); B = 0 for both, the
// weight untouched. The registry names every start once.
TEST(AdapterInits, RandomStartsDrawAAsPeftAndLeaveTheWeight) {
  EXPECT_EQ(adapter_init_names(), (std::vector<std::string>{"kaiming_uniform", "gaussian", "pissa", "olora"}));
  EXPECT_EQ(&default_adapter_init(), find_adapter_init(LoraSettings{}.init));
  EXPECT_THROW_WITH(adapter_init_by_name("eva"), InputError,
                    "lora.init must be kaiming_uniform, gaussian, pissa or olora (got \"eva\")");
  for (const std::string start : {"kaiming_uniform", "gaussian"}) {
    SCOPED_TRACE(start);
    torch::manual_seed(5);
    Model model(load_bundle(fixture("models/timm_script.pt")));
    std::vector<at::Tensor> before;
    for (const auto& p : model.module().named_parameters()) before.push_back(p.value.clone());
    LoraSettings settings;
    settings.rank = 4;
    settings.init = start;
    settings.targets = {"all-linear"};
    auto targets = resolve_targets(model.module(), settings, model.bundle().info.blocks);
    init_adapter_tensors(targets, model.module(), adapter_init_by_name(start));
    std::vector<at::Tensor> a;
    for (const auto& t : targets) {
      EXPECT_EQ(t.B().abs().max().item<float>(), 0.0f);
      EXPECT_FALSE(t.taken_A.defined());
      if (start == "kaiming_uniform")
        EXPECT_LE(t.A().abs().max().item<double>(), 1.0 / std::sqrt(static_cast<double>(t.in_features)));
      a.push_back(t.A().detach().flatten());
    }
    const double std = at::cat(a).std().item<double>();
    if (start == "gaussian") EXPECT_NEAR(std, 1.0 / settings.rank, 0.1 / settings.rank);
    size_t k = 0;
    for (const auto& p : model.module().named_parameters()) EXPECT_TRUE(at::equal(p.value, before.at(k++))) << p.name;
  }
}

TEST(Bundles, RefuseNoGradTracedAttentionWithAFix) {
  // The Python side writes this file (traced under no_grad) next to the other fixtures.
  EXPECT_THROW_WITH(load_bundle(fixture("models/torchvision_nograd.pt")), InputError,
                    "runs aten::_native_multi_head_attention, which has no backward");
}

TEST(Bundles, MissingOrForeignFilesAreClearErrors) {
  EXPECT_THROW_WITH(load_bundle(fixture("models/does_not_exist.pt")), InputError, "does not exist");
  EXPECT_THROW_WITH(load_bundle(fixture("models/ref_hf_script.safetensors")), InputError, "is not a TorchScript file");
}

TEST(Adapters, RefusedOnAnotherBase) {
  Model timm(load_bundle(fixture("models/timm_script.pt")));
  const auto path = fixture("models/adapter_hf_script");
  EXPECT_THROW_WITH(apply_adapter(timm, load_adapter(path), path.string()), InputError,
                    path.string() + " was made for another base: it adapts vit.encoder.layer.0.attention.attention.query");
}

}  // namespace
}  // namespace loratune
