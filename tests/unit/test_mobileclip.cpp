// MobileCLIP: the CLIP tokenizer, zero-shot heads, LoRA on fused q/v slices of MCi attention, the frozen-prefix cache.
#include <ATen/core/grad_mode.h>
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <map>

#include "loratune/adapter_binding.h"
#include "loratune/targets.h"
#include "loratune/errors.h"
#include "common/files.h"
#include "loratune/loader.h"
#include "loratune/merge.h"
#include "loratune/safetensors.h"
#include "loratune/train_step.h"
#include "loratune/trainer.h"
#include "loratune/training_setup.h"
#include "loratune/zero_shot.h"
#include "test_support.h"

namespace loratune {
namespace {

using nlohmann::json;
using test::fixture;

TEST(MobileClip, DefaultTargetsAreQAndVSlicesOfTheLastStage) {
  Model m(load_bundle(fixture("models/mobileclip_trace.pt")));
  const auto t = resolve_targets(m.module(), LoraSettings{});
  ASSERT_EQ(t.size(), 4u);
  EXPECT_EQ(t[0].module, "image_encoder.model.network.7.0.token_mixer.qkv");
  EXPECT_EQ(t[0].slice, "q");
  EXPECT_EQ(t[1].slice, "v");
  EXPECT_EQ(t[1].row_begin, 96);
}

// Captions longer than the text context are cut and counted; English words take a token each, Korean syllables more.
TEST(MobileClip, CaptionsLongerThanTheContextAreCountedWhenCut) {
  const TextEncoder text = load_text_encoder(fixture("models/mobileclip_text.pt"));
  std::string long_english, long_korean, fits;
  for (int i = 0; i < 100; ++i) long_english += "photo ";
  for (int i = 0; i < 40; ++i) long_korean += "빨간 사각형 ";
  for (int i = 0; i < 10; ++i) fits += "photo ";
  const std::vector<std::string> texts = {"a photo", long_english, fits, long_korean, ""};
  const TokenizedTexts t = tokenize_texts(text, texts);
  EXPECT_EQ(t.truncated, 2);
  EXPECT_TRUE(at::equal(t.tokens, text.tokenizer->tokenize(texts, text.context_length)));
  EXPECT_EQ(t.tokens.size(1), text.context_length);
}

TEST(MobileClip, ZeroShotHeadPredictsTheAgreedClasses) {
  Model model(load_bundle(fixture("models/mobileclip_trace.pt")));
  const ImageFolder folder = scan_image_folder(fixture("models/zeroshot"));
  TextEncoder text = load_text_encoder(text_model_for(model.bundle()));
  EXPECT_EQ(text.tokenizer->end_token(), 521);
  auto [weight, bias] = zero_shot_head(text, folder.classes, class_prompt_names(folder.classes, {}), default_templates());
  model.head().set(weight, bias);
  model.head().set_normalize_features(true);
  LoaderOptions o;
  o.batch_size = 4;
  ImageBatchSource source(folder, Preprocess::from_bundle(model.bundle().info), o);
  source.start_epoch(0, 0);
  at::NoGradGuard no_grad;
  int64_t seen = 0;
  while (auto b = source.next()) {
    const at::Tensor logits = model.logits(b->images);
    EXPECT_TRUE(at::equal(logits.argmax(1), b->labels));
    // The text and image embeddings agree: cosine 1, logit = logit_scale.
    EXPECT_NEAR(std::get<0>(logits.max(1)).min().item<double>(), 100.0, 1e-2);
    seen += b->images.size(0);
  }
  EXPECT_EQ(seen, 9);
}

TrainConfig mobileclip_config(const std::filesystem::path& out, json extra = json::object()) {
  json j = {{"model", fixture("models/mobileclip_trace.pt").string()},
            {"data", {{"train", "-"}, {"augment", {{"enabled", false}}}}},
            {"output_dir", out.string()},
            {"epochs", 3},
            {"batch_size", 4},
            {"precision", "fp32"},
            {"optim", {{"lr", 0.01}}},
            {"lora", {{"rank", 4}, {"dropout", 0.0}}},
            {"log_every_steps", 1}};
  j.merge_patch(extra);
  return parse_train_config(j, "test");
}

std::unique_ptr<Model> lora_model(const TrainConfig& c) { return build_training_model(c, {"a", "b", "c"}); }

struct Images {
  at::Tensor x, y;
  Images() {
    at::Generator gen = at::detail::createCPUGenerator(3);
    y = at::arange(12, at::kLong) % 3;
    x = at::rand({12, 3, 64, 64}, gen) * 0.3 + y.to(at::kFloat).view({12, 1, 1, 1}) * 0.3;
  }
};

TEST(MobileClip, TrainingTouchesOnlyQAndVRowsAndKeepsBatchNormFrozen) {
  const auto dir = test::temp_dir("mobileclip_rows");
  const TrainConfig c = mobileclip_config(dir / "run");
  auto model = lora_model(c);
  std::map<std::string, at::Tensor> buffers_before;
  for (const auto& b : model->module().named_buffers()) buffers_before[b.name] = b.value.clone();
  Images data;
  TensorBatchSource train(data.x, data.y, 4, true, true, 0);
  Trainer(c, *model, train, nullptr, {"a", "b", "c"}, c10::Device(c10::kCPU), Precision::kFp32).run(false);
  for (const auto& b : model->module().named_buffers())
    EXPECT_TRUE(at::equal(b.value, buffers_before.at(b.name))) << "BatchNorm statistics must not move: " << b.name;

  merge_adapter(c.model, dir / "run" / Trainer::kLastAdapter, dir / "merged.pt", MergeOptions{});
  const Bundle base = load_bundle(c.model), merged = load_bundle(dir / "merged.pt");
  std::map<std::string, at::Tensor> merged_params;
  for (const auto& p : merged.module.named_parameters()) merged_params[p.name] = p.value;
  int qkv = 0;
  for (const auto& p : base.module.named_parameters()) {
    const at::Tensor& after = merged_params.at("backbone." + p.name);
    if (p.name.find("network.7.") != std::string::npos && p.name.find("token_mixer.qkv.weight") != std::string::npos) {
      ++qkv;
      const int64_t n = p.value.size(0) / 3;
      EXPECT_FALSE(at::equal(after.narrow(0, 0, n), p.value.narrow(0, 0, n))) << p.name << " q rows changed";
      EXPECT_TRUE(at::equal(after.narrow(0, n, n), p.value.narrow(0, n, n))) << p.name << " k rows untouched";
      EXPECT_FALSE(at::equal(after.narrow(0, 2 * n, n), p.value.narrow(0, 2 * n, n))) << p.name << " v rows changed";
    } else {
      EXPECT_TRUE(at::equal(after, p.value)) << p.name << " must be bit-identical";
    }
  }
  EXPECT_EQ(qkv, 2);
}

TEST(MobileClip, PrefixCacheGivesIdenticalTrainingWithoutAugmentation) {
  Images data, val;
  std::string metrics[2];
  std::filesystem::path dir_of[2];
  for (int cached = 0; cached < 2; ++cached) {
    const auto dir = test::temp_dir(std::string("prefix_cache_") + (cached ? "on" : "off"));
    // Adapters in the last attention block only: the stem and block 0 form the frozen prefix.
    const TrainConfig c = mobileclip_config(dir, {{"data", {{"prefix_cache", cached ? "memory" : "off"}}},
                                                  {"lora", {{"targets", {"network.7.1.token_mixer.qkv:q,v"}}}}});
    auto model = lora_model(c);
    EXPECT_EQ(model->blocks().frozen_prefix(), 1);
    TensorBatchSource train(data.x, data.y, 4, true, true, 0);
    TensorBatchSource validation(val.x, val.y, 5, false, false, 0);
    Trainer(c, *model, train, &validation, {"a", "b", "c"}, c10::Device(c10::kCPU), Precision::kFp32).run(false);
    dir_of[cached] = dir;
    metrics[cached] = read_file(dir / Trainer::kMetrics);
  }
  // The same computation up to float rounding: BLAS kernels treat a row differently by its position in the batch,
  // and cached rows are batched with other rows than when they were computed, so the last bits may differ.
  const auto a0 = load_adapter(dir_of[0] / Trainer::kLastAdapter), a1 = load_adapter(dir_of[1] / Trainer::kLastAdapter);
  for (size_t i = 0; i < a0.targets.size(); ++i) EXPECT_LT(test::scaled_diff(a1.targets[i].B(), a0.targets[i].B()), 1e-5);
  // Losses (the lines differ only in timing fields).
  auto losses = [](const std::string& text) {
    std::vector<double> out;
    std::istringstream in(text);
    for (std::string line; std::getline(in, line);) {
      const json j = json::parse(line);
      out.push_back(j.contains("loss") ? j["loss"].get<double>() : j["val_loss"].get<double>());
    }
    return out;
  };
  const auto l0 = losses(metrics[0]), l1 = losses(metrics[1]);
  ASSERT_EQ(l0.size(), l1.size());
  for (size_t i = 0; i < l0.size(); ++i) EXPECT_NEAR(l0[i], l1[i], 1e-6 * std::abs(l0[i])) << "line " << i;
}

// The model of the contrastive reference: both towers, the PEFT-style adapter on both (routed by which tower has
// each module: the file has no tower marks).
std::unique_ptr<Model> contrastive_model(bool with_adapter = true) {
  auto model = std::make_unique<Model>(load_bundle(fixture("models/mobileclip_trace.pt")));
  model->set_text_tower(load_bundle(fixture("models/mobileclip_text.pt")));
  if (with_adapter) apply_adapter(*model, load_adapter(fixture("models/adapter_contrastive")), "adapter_contrastive");
  return model;
}

std::string peft_key(const LoraTarget& t, const std::string& tensor) {
  return "base_model.model." + t.module + ".lora_" + tensor + "." + t.slice + ".weight";
}

TEST(Contrastive, LossAndGradientsThroughBothTowersMatchPython) {
  const auto ref = safetensors::read(fixture("models/ref_contrastive.safetensors")).tensors;
  for (bool checkpoint : {false, true}) {
    SCOPED_TRACE(checkpoint ? "with checkpointing" : "without checkpointing");
    auto model = contrastive_model();
    ASSERT_EQ(model->adapters().size(), 4u);       // q and v of the last stage's 2 attention blocks
    ASSERT_EQ(model->text_adapters().size(), 4u);  // q and v of the 2 text blocks
    EXPECT_EQ(model->trainable().size(), 16u);     // A and B of each; the head (none here) would not train
    const at::Tensor loss = contrastive_loss(model->features(ref.at("input"), checkpoint),
                                             model->text_features(ref.at("tokens").to(at::kLong), checkpoint),
                                             ref.at("logit_scale").item<double>());
    EXPECT_NEAR(loss.item<double>(), ref.at("loss").item<double>(), 1e-5);
    loss.backward();
    for (const auto* targets : {&model->adapters(), &model->text_adapters()})
      for (const auto& t : *targets) {
        SCOPED_TRACE(t.describe());
        EXPECT_LT(test::scaled_diff(t.A().grad(), ref.at("grad." + peft_key(t, "A"))), 1e-4);
        EXPECT_LT(test::scaled_diff(t.B().grad(), ref.at("grad." + peft_key(t, "B"))), 1e-4);
      }
  }
}

// contrastive.negatives step: the four pairs embedded as two micro-batches with cached embeddings give the
// loss and gradients Python computes over all four at once, with and without grouping rows 0 and 3 (one class).
TEST(Contrastive, CachedStepNegativesGiveTheFullBatchLossAndGradientsOfPython) {
  const auto ref = safetensors::read(fixture("models/ref_contrastive.safetensors")).tensors;
  const at::Tensor input = ref.at("input"), tokens = ref.at("tokens").to(at::kLong);
  // Not micro-batches of one image: LibTorch 1.13's CPU backward of BatchNorm (eval) on one image followed by
  // flatten + transpose is wrong (torch.autograd.gradcheck fails on the fixture's attention blocks in Python too).
  const std::vector<std::pair<int64_t, int64_t>> micro_batches = {{0, 2}, {2, 2}};
  for (bool grouped : {false, true})
    for (bool checkpoint : {false, true}) {
      SCOPED_TRACE(std::string(grouped ? "grouped" : "every other pair a negative") +
                   (checkpoint ? ", with checkpointing" : ""));
      auto model = contrastive_model();
      const at::Tensor groups = grouped ? ref.at("groups").to(at::kLong) : at::Tensor();
      const double loss = backward_contrastive_cached(
          static_cast<int64_t>(micro_batches.size()),
          [&](int64_t k) {
            const auto [begin, n] = micro_batches[static_cast<size_t>(k)];
            return PairedFeatures{model->features(input.narrow(0, begin, n), checkpoint),
                                  model->text_features(tokens.narrow(0, begin, n), checkpoint)};
          },
          ref.at("logit_scale").item<double>(), groups, 1.0, LossScaler(false, {}), c10::Device(c10::kCPU));
      const std::string prefix = grouped ? "grouped_" : "";
      EXPECT_NEAR(loss, ref.at(prefix + "loss").item<double>(), 1e-5);
      for (const auto* targets : {&model->adapters(), &model->text_adapters()})
        for (const auto& t : *targets) {
          SCOPED_TRACE(t.describe());
          EXPECT_LT(test::scaled_diff(t.A().grad(), ref.at(prefix + "grad." + peft_key(t, "A"))), 1e-4);
          EXPECT_LT(test::scaled_diff(t.B().grad(), ref.at(prefix + "grad." + peft_key(t, "B"))), 1e-4);
        }
    }
  // The loss of one micro-batch with the same groups: Python's grouped loss.
  auto model = contrastive_model();
  at::NoGradGuard no_grad;
  EXPECT_NEAR(contrastive_loss(model->features(input), model->text_features(tokens), ref.at("logit_scale").item<double>(),
                               ref.at("groups").to(at::kLong)).item<double>(),
              ref.at("grouped_loss").item<double>(), 1e-5);
}

// The same in float64 (both towers, their adapters and the inputs): the cached micro-batches give the loss and the
// gradients of the whole batch computed at once, to rounding.
TEST(Contrastive, CachedStepNegativesEqualTheWholeBatchInFloat64) {
  const auto ref = safetensors::read(fixture("models/ref_contrastive.safetensors")).tensors;
  const at::Tensor input = ref.at("input").to(at::kDouble), tokens = ref.at("tokens").to(at::kLong);
  const at::Tensor groups = ref.at("groups").to(at::kLong);
  const double scale = ref.at("logit_scale").item<double>();
  const auto run = [&](bool cached) {
    auto model = contrastive_model();
    model->module().to(at::kDouble);
    torch::jit::Module text = model->text_bundle().module;
    text.to(at::kDouble);
    const auto trainable = model->trainable();
    for (const auto& t : trainable) t.tensor.set_data(t.tensor.detach().to(at::kDouble));
    const auto embed = [&](int64_t begin, int64_t n) {
      return PairedFeatures{model->features(input.narrow(0, begin, n), true),
                            model->text_features(tokens.narrow(0, begin, n), true)};
    };
    double loss = 0;
    if (cached) {
      loss = backward_contrastive_cached(2, [&](int64_t k) { return embed(2 * k, 2); }, scale, groups, 1.0,
                                         LossScaler(false, {}), c10::Device(c10::kCPU));
    } else {
      const PairedFeatures f = embed(0, 4);
      EXPECT_EQ(f.image.scalar_type(), at::kDouble);
      const at::Tensor whole = contrastive_loss(f.image, f.text, scale, groups);
      whole.backward();
      loss = whole.item<double>();
    }
    std::vector<at::Tensor> grads;
    for (const auto& t : trainable) grads.push_back(t.tensor.grad().clone());
    return std::make_pair(loss, grads);
  };
  const auto [cached_loss, cached_grads] = run(true);
  const auto [whole_loss, whole_grads] = run(false);
  EXPECT_NEAR(cached_loss, whole_loss, 1e-12);
  EXPECT_NEAR(whole_loss, ref.at("grouped_loss").item<double>(), 1e-5);  // and it is Python's
  ASSERT_EQ(cached_grads.size(), 16u);
  for (size_t i = 0; i < cached_grads.size(); ++i)
    EXPECT_LT(test::max_abs_diff(cached_grads[i], whole_grads[i]), 1e-10 * whole_grads[i].abs().max().item<double>()) << i;
}

TEST(Contrastive, AdapterFilesMarkTheTextTowerAndModelsWithoutItKeepOnlyTheHead) {
  auto model = contrastive_model();
  model->head().init(3);
  const auto dir = test::temp_dir("contrastive_adapter");
  save_adapter(dir / "a", adapter_from_model(*model, {"blue", "green", "red"}, json::object()));
  const Adapter a = load_adapter(dir / "a");
  ASSERT_EQ(a.targets.size(), 4u);
  ASSERT_EQ(a.text_targets.size(), 4u);
  EXPECT_EQ(a.text_targets[0].module.rfind("text_encoder.", 0), 0u);
  EXPECT_EQ(a.text_base_fingerprint, model->text_bundle().fingerprint);
  // Without the text tower: the image adapters and the head; with it: both towers, equal to the source model's.
  Model image_only(load_bundle(fixture("models/mobileclip_trace.pt")));
  apply_adapter(image_only, a, "a");
  EXPECT_EQ(image_only.adapters().size(), 4u);
  auto both = contrastive_model(false);
  apply_adapter(*both, a, "a");
  ASSERT_EQ(both->text_adapters().size(), 4u);
  const at::Tensor tokens = at::randint(1, 100, {2, 77}, at::kLong);
  at::NoGradGuard no_grad;
  EXPECT_TRUE(at::equal(both->text_features(tokens), model->text_features(tokens)));
  // Another text tower (other weights, same shapes) is refused by fingerprint.
  auto other = std::make_unique<Model>(load_bundle(fixture("models/mobileclip_trace.pt")));
  Bundle text = load_bundle(fixture("models/mobileclip_text.pt"));
  text.fingerprint = "0000";
  other->set_text_tower(std::move(text));
  EXPECT_THROW_WITH(apply_adapter(*other, a, "a"), InputError, "trained with a different text tower");
}

}  // namespace
}  // namespace loratune
