// The training loop on in-memory batches (no OpenCV): accumulation, checkpointing, resume, scaler, NaN handling.
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <fstream>
#include <map>

#include "loratune/adapter.h"
#include "loratune/adapter_binding.h"
#include "loratune/config.h"
#include "loratune/errors.h"
#include "common/files.h"
#include "common/fingerprint.h"
#include "loratune/optim.h"
#include "loratune/safetensors.h"
#include "loratune/threads.h"
#include "loratune/train_step.h"
#include "loratune/trainer.h"
#include "loratune/training_setup.h"
#include "train/checkpoint.h"
#include "test_support.h"

namespace loratune {
namespace {

using nlohmann::json;
using test::fixture;
using test::max_abs_diff;

TrainConfig make_config(const std::filesystem::path& out, json overrides = json::object()) {
  json j = {{"model", fixture("models/hf_script.pt").string()},
            {"data", {{"train", "unused"}}},
            {"output_dir", out.string()},
            {"epochs", 2},
            {"lora", {{"dropout", 0.0}}},
            {"precision", "fp32"},
            {"gradient_checkpointing", false},
            {"log_every_steps", 1}};
  j.merge_patch(overrides);
  return parse_train_config(j, "test config");
}

std::unique_ptr<Model> make_model(const TrainConfig& c, int64_t classes) {
  std::vector<std::string> names;
  for (int64_t i = 0; i < classes; ++i) names.push_back(std::string(1, static_cast<char>('a' + i)));
  return build_training_model(c, names);
}

struct ToyData {
  at::Tensor images, labels;
  ToyData(int64_t n, uint64_t seed) {
    at::Generator gen = at::detail::createCPUGenerator(seed);
    labels = at::arange(n, at::kLong) % 3;
    images = at::randn({n, 3, 32, 32}, gen) * 0.5 + labels.to(at::kFloat).view({n, 1, 1, 1}) - 1.0;
  }
};

std::string bytes_of(const std::filesystem::path& p) { return read_file(p); }

TEST(Training, GradientAccumulationMatchesOneLargeBatch) {
  ToyData data(16, 1);
  std::vector<at::Tensor> results[2];
  int run = 0;
  for (auto [batch, accum] : {std::pair{8, 1}, std::pair{2, 4}}) {
    const auto dir = test::temp_dir("accum" + std::to_string(batch));
    const TrainConfig c = make_config(dir, {{"batch_size", batch}, {"grad_accum_steps", accum}, {"max_steps", 3}});
    auto model = make_model(c, 3);
    TensorBatchSource train(data.images, data.labels, c.batch_size, true, true, c.seed);
    Trainer(c, *model, train, nullptr, {"a", "b", "c"}, c10::Device(c10::kCPU), Precision::kFp32).run(false);
    for (const auto& t : model->trainable()) results[run].push_back(t.tensor.detach().clone());
    ++run;
  }
  ASSERT_EQ(results[0].size(), results[1].size());
  for (size_t i = 0; i < results[0].size(); ++i) EXPECT_LT(max_abs_diff(results[0][i], results[1][i]), 1e-5);
  // and training did move the adapters
  EXPECT_GT(results[0][1].abs().max().item<double>(), 0.0);
}

TEST(Training, CheckpointingGivesIdenticalLossAndGradients) {
  ToyData data(4, 2);
  const TrainConfig c = make_config(test::temp_dir("ckpt"), {{"lora", {{"dropout", 0.3}}}});
  for (const std::string layout : {"hf_script", "timm_trace", "torchvision_script"}) {
    SCOPED_TRACE(layout);
    TrainConfig lc = c;
    lc.model = fixture("models/" + layout + ".pt").string();
    std::vector<at::Tensor> grads[2];
    double losses[2];
    for (int checkpoint = 0; checkpoint < 2; ++checkpoint) {
      auto model = make_model(lc, 3);
      {  // non-zero B so that every adapter tensor gets a gradient
        at::NoGradGuard no_grad;
        for (const auto& t : model->adapters()) t.B().normal_(0, 0.1);
      }
      model->set_training(true);
      torch::manual_seed(123);  // same dropout masks
      const at::Tensor loss = at::cross_entropy_loss(model->logits(data.images, checkpoint == 1), data.labels);
      loss.backward();
      losses[checkpoint] = loss.item<double>();
      for (const auto& t : model->trainable()) grads[checkpoint].push_back(t.tensor.grad().clone());
    }
    EXPECT_EQ(losses[0], losses[1]);
    for (size_t i = 0; i < grads[0].size(); ++i) EXPECT_LT(max_abs_diff(grads[0][i], grads[1][i]), 1e-7) << i;
  }
}

TEST(Training, InterruptedAndResumedEqualsUninterruptedByteForByte) {
  ToyData data(12, 3), val(6, 4);
  const json settings = {{"batch_size", 2},  {"grad_accum_steps", 2}, {"epochs", 3},
                         {"lora", {{"dropout", 0.2}}}, {"gradient_checkpointing", true}};
  const auto straight = test::temp_dir("straight"), resumed = test::temp_dir("resumed");
  auto run = [&](const std::filesystem::path& dir, bool resume, TrainerHooks hooks) {
    const TrainConfig c = make_config(dir, settings);
    auto model = make_model(c, 3);
    TensorBatchSource train(data.images, data.labels, c.batch_size, true, true, c.seed);
    TensorBatchSource validation(val.images, val.labels, 4, false, false, 0);
    return Trainer(c, *model, train, &validation, {"a", "b", "c"}, c10::Device(c10::kCPU), Precision::kFp32, hooks).run(resume);
  };
  const TrainSummary full = run(straight, false, {});
  EXPECT_EQ(full.steps, 9);
  // Interrupt mid-epoch (step 4 of 3 per epoch), then at an epoch boundary (step 6), then finish.
  EXPECT_THROW(run(resumed, false, {[](int64_t step) { return step == 4; }}), Interrupted);
  EXPECT_THROW_WITH(run(resumed, false, {}), InputError, "already holds a run; continue it with --resume");
  EXPECT_THROW(run(resumed, true, {[](int64_t step) { return step == 6; }}), Interrupted);
  run(resumed, true, {});
  for (const char* dir : {Trainer::kLastAdapter, Trainer::kBestAdapter})
    EXPECT_EQ(bytes_of(straight / dir / kAdapterWeightsName), bytes_of(resumed / dir / kAdapterWeightsName)) << dir;
  EXPECT_EQ(bytes_of(straight / Trainer::kMetrics).size() > 0, true);
  // The metrics have one line per step and validation, without duplicates from the interrupted attempts.
  std::ifstream in(resumed / Trainer::kMetrics);
  int lines = 0;
  for (std::string line; std::getline(in, line);) ++lines;
  EXPECT_EQ(lines, 9 + 3);
}

TEST(Training, StoppedAfterAnyStepResumesToTheSameFilesIncludingTheLastStep) {
  // 11 images, micro-batches of 2 (the sixth holds one image), 2 per step: 3 steps an epoch, the last one partial.
  ToyData data(11, 5), val(4, 6);
  const json settings = {{"batch_size", 2}, {"grad_accum_steps", 2}, {"epochs", 2}, {"lora", {{"dropout", 0.1}}}};
  auto run = [&](const std::filesystem::path& dir, bool resume, TrainerHooks hooks) {
    const TrainConfig c = make_config(dir, settings);
    auto model = make_model(c, 3);
    TensorBatchSource train(data.images, data.labels, c.batch_size, true, false, c.seed);
    TensorBatchSource validation(val.images, val.labels, 4, false, false, 0);
    return Trainer(c, *model, train, &validation, {"a", "b", "c"}, c10::Device(c10::kCPU), Precision::kFp32, hooks).run(resume);
  };
  const auto straight = test::temp_dir("every_straight");
  const TrainSummary full = run(straight, false, {});
  ASSERT_EQ(full.steps, 6);
  EXPECT_EQ(full.images_seen, 22);
  for (int64_t stop = 1; stop <= 6; ++stop) {
    SCOPED_TRACE("stopped after step " + std::to_string(stop));
    const auto dir = test::temp_dir("every_" + std::to_string(stop));
    EXPECT_THROW(run(dir, false, {[stop](int64_t step) { return step == stop; }}), Interrupted);
    const TrainSummary resumed = run(dir, true, {});
    EXPECT_EQ(resumed.steps, 6);
    EXPECT_EQ(resumed.best_epoch, full.best_epoch);
    for (const char* name : {Trainer::kLastAdapter, Trainer::kBestAdapter})
      EXPECT_EQ(bytes_of(straight / name / kAdapterWeightsName), bytes_of(dir / name / kAdapterWeightsName)) << name;
    auto lines = [](const std::filesystem::path& file) {
      const std::string text = bytes_of(file);
      return std::count(text.begin(), text.end(), '\n');
    };
    EXPECT_EQ(lines(straight / Trainer::kMetrics), lines(dir / Trainer::kMetrics));
  }
}

TEST(Training, EpochCountsThatOverflowAreRefused) {
  ToyData data(8, 3);
  const TrainConfig c = make_config(test::temp_dir("overflow"), {{"batch_size", 2}, {"epochs", int64_t{1} << 62}});
  auto model = make_model(c, 3);
  TensorBatchSource train(data.images, data.labels, c.batch_size, true, false, c.seed);
  EXPECT_THROW_WITH(Trainer(c, *model, train, nullptr, {"a", "b", "c"}, c10::Device(c10::kCPU), Precision::kFp32).run(false),
                    InputError, "more steps than can be counted");
}

// A library user drives progress and metrics through a reporter of their own.
class RecordingReporter : public TrainingReporter {
 public:
  std::vector<int64_t> steps;
  std::vector<double> validation_losses;
  int epochs_begun = 0, epochs_ended = 0, metrics_lines = 0;
  void epoch_begin(int64_t, int64_t, int64_t, int64_t) override { ++epochs_begun; }
  void step_end(const Step& s) override { steps.push_back(s.step); }
  void epoch_end() override { ++epochs_ended; }
  void validation_end(const Validation& v) override { validation_losses.push_back(v.loss); }
  void metrics_line(const nlohmann::json&) override { ++metrics_lines; }
};

TEST(Training, AReporterOfTheProgramsOwnSeesEveryStepValidationAndMetricsLine) {
  ToyData data(8, 3), val(4, 4);
  const TrainConfig c = make_config(test::temp_dir("reporter"), {{"batch_size", 2}});
  auto model = make_model(c, 3);
  TensorBatchSource train(data.images, data.labels, c.batch_size, true, false, c.seed);
  TensorBatchSource validation(val.images, val.labels, 4, false, false, 0);
  auto reporter = std::make_shared<RecordingReporter>();
  TrainerHooks hooks;
  hooks.reporter = reporter;
  const TrainSummary s =
      Trainer(c, *model, train, &validation, {"a", "b", "c"}, c10::Device(c10::kCPU), Precision::kFp32, hooks).run(false);
  EXPECT_EQ(reporter->steps, (std::vector<int64_t>{1, 2, 3, 4, 5, 6, 7, 8}));
  EXPECT_EQ(reporter->epochs_begun, 2);
  EXPECT_EQ(reporter->epochs_ended, 2);
  ASSERT_EQ(reporter->validation_losses.size(), 2u);
  EXPECT_DOUBLE_EQ(reporter->validation_losses.back(), s.final_val_loss);
  const std::string metrics = bytes_of(std::filesystem::path(c.output_dir) / Trainer::kMetrics);
  EXPECT_EQ(reporter->metrics_lines, std::count(metrics.begin(), metrics.end(), '\n'));
}

TEST(Training, ZeroShotHeadsNeedTheTextLibrarysInitializer) {
  const TrainConfig c = make_config(test::temp_dir("zs"), {{"head", {{"init", "zero_shot"}}}});
  EXPECT_THROW_WITH(build_training_model(c, {"a", "b"}), InputError, "pass loratune::zero_shot_head_initializer()");
  int calls = 0;
  auto model = build_training_model(c, {"a", "b"}, [&](Model& m, const std::vector<std::string>& classes, const HeadConfig&) {
    ++calls;
    m.head().set(at::ones({static_cast<int64_t>(classes.size()), m.bundle().info.feature_dim}), at::zeros({2}));
  });
  EXPECT_EQ(calls, 1);
  EXPECT_TRUE(at::equal(model->head().weight(), at::ones({2, model->bundle().info.feature_dim})));
}

TEST(Recipes, LoraPlusGivesTheBMatricesRatioTimesTheLearningRate) {
  // From B = 0 the first AdamW update of B is -lr * g / (|g| + eps) per element; A gets no gradient yet.
  ToyData data(8, 3);
  std::vector<at::Tensor> a[2], b[2];
  for (int plus = 0; plus < 2; ++plus) {
    json settings = {{"batch_size", 8}, {"max_steps", 1}, {"optim", {{"grad_clip", 0.0}}}};
    if (plus) settings["optim"]["lora_plus_ratio"] = 16.0;
    const TrainConfig c = make_config(test::temp_dir("loraplus" + std::to_string(plus)), settings);
    auto model = make_model(c, 3);
    TensorBatchSource train(data.images, data.labels, c.batch_size, false, false, c.seed);
    TrainerHooks quiet;
    quiet.reporter = std::make_shared<TrainingReporter>();
    Trainer(c, *model, train, nullptr, {"a", "b", "c"}, c10::Device(c10::kCPU), Precision::kFp32, quiet).run(false);
    for (const auto& t : model->adapters()) a[plus].push_back(t.A().detach().clone()), b[plus].push_back(t.B().detach().clone());
  }
  for (size_t i = 0; i < b[0].size(); ++i) {
    EXPECT_TRUE(at::equal(a[0][i], a[1][i]));
    EXPECT_GT(b[0][i].abs().max().item<double>(), 0.0);
    EXPECT_LT(test::max_abs_diff(b[1][i], b[0][i] * 16.0), 1e-6 * b[1][i].abs().max().item<double>());
  }
  EXPECT_THROW_WITH(make_config(test::temp_dir("lp_bad"), {{"optim", {{"lora_plus_ratio", 0}}}}), InputError,
                    "optim.lora_plus_ratio must be positive");
}

TEST(Recipes, EarlyStoppingEndsTheRunAndResumeKeepsItEnded) {
  ToyData data(8, 3), val(4, 4);
  // A learning rate too small to change anything: the first validation stays the best, the second is no better.
  const TrainConfig c = make_config(test::temp_dir("early"), {{"batch_size", 4}, {"epochs", 5}, {"optim", {{"lr", 1e-12}}},
                                                              {"early_stopping", {{"patience", 1}}}});
  auto run = [&](bool resume) {
    auto model = make_model(c, 3);
    TensorBatchSource train(data.images, data.labels, c.batch_size, true, false, c.seed);
    TensorBatchSource validation(val.images, val.labels, 4, false, false, 0);
    return Trainer(c, *model, train, &validation, {"a", "b", "c"}, c10::Device(c10::kCPU), Precision::kFp32).run(resume);
  };
  const TrainSummary s = run(false);
  EXPECT_TRUE(s.stopped_early);
  EXPECT_EQ(s.epochs, 2);
  EXPECT_EQ(s.best_epoch, 1);
  EXPECT_EQ(s.steps, 4);
  const std::string summary = bytes_of(std::filesystem::path(c.output_dir) / Trainer::kSummary);
  EXPECT_THROW_WITH(run(true), InputError, "has finished (step 4 of 10, stopped early): nothing to resume");
  EXPECT_EQ(bytes_of(std::filesystem::path(c.output_dir) / Trainer::kSummary), summary) << "a stopped run stays stopped";
  EXPECT_THROW_WITH(make_config(test::temp_dir("early_bad"), {{"early_stopping", {{"patience", 0}}}}), InputError,
                    "early_stopping.patience must be at least 1");
}

TEST(Recipes, LastBlocksAdaptOnlyThemAndFreezeThePrefix) {
  const TrainConfig c = make_config(test::temp_dir("last"), {{"lora", {{"last_blocks", 1}}}});
  auto model = make_model(c, 3);
  ASSERT_EQ(model->adapters().size(), 2u);  // q and v of the last of 2 blocks
  for (const auto& t : model->adapters()) EXPECT_EQ(t.module.rfind("vit.encoder.layer.1.", 0), 0u) << t.module;
  EXPECT_EQ(model->blocks().frozen_prefix(), 1);
  const TrainConfig too_many = make_config(test::temp_dir("last3"), {{"lora", {{"last_blocks", 3}}}});
  EXPECT_THROW_WITH(make_model(too_many, 3), InputError, "lora.last_blocks 3 is more than the 2 blocks");
}

TEST(Training, ResumeRefusesAChangedConfiguration) {
  ToyData data(8, 3);
  const auto dir = test::temp_dir("changed");
  {
    const TrainConfig c = make_config(dir, {{"batch_size", 2}});
    auto model = make_model(c, 3);
    TensorBatchSource train(data.images, data.labels, c.batch_size, true, true, c.seed);
    EXPECT_THROW(Trainer(c, *model, train, nullptr, {"a", "b", "c"}, c10::Device(c10::kCPU), Precision::kFp32,
                         {[](int64_t) { return true; }}).run(false), Interrupted);
  }
  const TrainConfig changed = make_config(dir, {{"batch_size", 2}, {"optim", {{"lr", 0.5}}}});
  auto model = make_model(changed, 3);
  TensorBatchSource train(data.images, data.labels, 2, true, true, 0);
  EXPECT_THROW_WITH(Trainer(changed, *model, train, nullptr, {"a", "b", "c"}, c10::Device(c10::kCPU), Precision::kFp32).run(true),
                    InputError, "was written with other settings (recorded vs now: optim.lr 0.001 vs 0.5)");
}

// A run of 9 steps (3 an epoch) stopped after step 4, for the checkpoint tests: the checkpoint says epoch 1 (0-based),
// step 1 in it.
struct StoppedRun {
  ToyData data{12, 3};
  json settings = {{"batch_size", 2}, {"grad_accum_steps", 2}, {"epochs", 3}};
  TrainSummary run(const std::filesystem::path& dir, bool resume, TrainerHooks hooks = {}) {
    const TrainConfig c = make_config(dir, settings);
    auto model = make_model(c, 3);
    TensorBatchSource train(data.images, data.labels, c.batch_size, true, true, c.seed);
    return Trainer(c, *model, train, nullptr, {"a", "b", "c"}, c10::Device(c10::kCPU), Precision::kFp32, hooks).run(resume);
  }
  void stop_after_4(const std::filesystem::path& dir) {
    EXPECT_THROW(run(dir, false, {[](int64_t step) { return step == 4; }}), Interrupted);
  }
};

TEST(Training, CheckpointValuesOutsideTheRunAreRefusedAndLeaveItResumable) {
  StoppedRun r;
  const auto straight = test::temp_dir("ckpt_straight"), dir = test::temp_dir("ckpt_edited");
  r.run(straight, false);
  r.stop_after_4(dir);
  const auto path = dir / Trainer::kCheckpoint;
  const std::string original = bytes_of(path);
  const safetensors::Contents good = safetensors::read(path);
  const json progress = json::parse(good.metadata.at("progress"));
  ASSERT_EQ(progress.at("epoch"), 1);
  ASSERT_EQ(progress.at("step_in_epoch"), 1);

  // Edits a hostile user could make, checksum recomputed: every one is refused by name.
  struct Edit {
    json patch;
    const char* message;
  };
  const Edit edits[] = {
      {{{"step_in_epoch", -1}}, "step_in_epoch = -1 is outside [0, 3]"},
      {{{"step_in_epoch", -5}}, "step_in_epoch = -5 is outside"},
      {{{"step_in_epoch", 2}}, "progress step 4 does not fall in epoch 2 at step 2"},
      {{{"epoch", -(int64_t{1} << 62)}}, "progress epoch = -4611686018427387904 is outside [0, 3]"},
      {{{"epoch", int64_t{1} << 62}}, "progress epoch = 4611686018427387904 is outside [0, 3]"},
      {{{"step", 1000}}, "progress step = 1000 is outside [0, 9]"},
      {{{"step", "4"}}, "progress step is not an integer"},
      {{{"metrics_lines", -1}}, "metrics_lines = -1 is outside"},
      {{{"nonfinite_streak", 5}}, "nonfinite_streak = 5 is outside [0, 4]"},
      {{{"best_top1", 7}}, "best_top1 = 7 is outside [-1, 1]"},
      {{{"best_epoch", 3}}, "best_epoch = 3 is outside [-1, 1]"},
      {{{"loss_scale", 0}}, "loss_scale = 0 is outside"},
      {{{"loss_scale", -1e300}}, "loss_scale"},
      {{{"stopped_early", 1}}, "stopped_early is not true or false"},
      {{{"step", nullptr}}, "its progress record has no step"},
  };
  for (const auto& edit : edits) {
    SCOPED_TRACE(edit.patch.dump());
    json edited = progress;
    edited.merge_patch(edit.patch);
    safetensors::Metadata metadata = good.metadata;
    metadata["progress"] = edited.dump();
    write_checkpoint(path, good.tensors, metadata);
    EXPECT_THROW_WITH(r.run(dir, true), InputError, edit.message);
  }
  // Tensors that do not fit the run, checksum recomputed.
  auto with_tensor = [&](const std::string& name, const at::Tensor& t) {
    safetensors::Tensors tensors = good.tensors;
    tensors[name] = t;
    write_checkpoint(path, tensors, good.metadata);
  };
  const std::string param = std::find_if(good.tensors.begin(), good.tensors.end(), [](const auto& kv) {
                              return kv.first.rfind("param.", 0) == 0;
                            })->first;
  with_tensor(param, at::zeros({1}));
  EXPECT_THROW_WITH(r.run(dir, true), InputError, param + " is Float [1], this run needs Float");
  with_tensor(param, good.tensors.at(param).clone().fill_(std::nan("")));
  EXPECT_THROW_WITH(r.run(dir, true), InputError, param + " holds inf or NaN");
  const std::string avg_sq = "adamw." + param.substr(6) + ".exp_avg_sq";
  with_tensor(avg_sq, good.tensors.at(avg_sq).clone().fill_(-1));
  EXPECT_THROW_WITH(r.run(dir, true), InputError, avg_sq + " has negative values");
  with_tensor("rng.cpu", good.tensors.at("rng.cpu").narrow(0, 0, 10).clone());
  EXPECT_THROW_WITH(r.run(dir, true), InputError, "rng.cpu is Byte [10], this run needs Byte");
  at::Tensor rng = good.tensors.at("rng.cpu").clone();
  rng[19] = 1;  // the right size, but mt19937's position (bytes 16-23) past its 624 words: a state LibTorch refuses
  with_tensor("rng.cpu", rng);
  EXPECT_THROW_WITH(r.run(dir, true), InputError, "random generator state (rng.cpu) is not one LibTorch accepts");
  with_tensor("adamw.steps", at::tensor(int64_t{-3}, at::kLong));
  EXPECT_THROW_WITH(r.run(dir, true), InputError, "adamw.steps is negative");

  // An edit without a new checksum: refused as damaged. Then the original resumes to the uninterrupted result.
  safetensors::Metadata metadata = good.metadata;
  metadata["progress"] = json(progress).dump(1);
  safetensors::write(path, good.tensors, metadata);
  EXPECT_THROW_WITH(r.run(dir, true), InputError, "is damaged (its checksum does not match its contents)");
  write_file_atomic(path, original);
  r.run(dir, true);
  EXPECT_EQ(bytes_of(straight / Trainer::kLastAdapter / kAdapterWeightsName),
            bytes_of(dir / Trainer::kLastAdapter / kAdapterWeightsName));
}

// An upgrade that adds a key (at a default that keeps the old behaviour) must not strand the runs begun before it:
// a checkpoint whose settings lack the key resumes to the uninterrupted result, in today's format and in the one
// before it (a hash of the settings in config.json, nothing else); setting the new key to another value is refused
// by name.
TEST(Training, CheckpointsFromBeforeAnUpgradeThatAddedAKeyResume) {
  StoppedRun r;
  const auto straight = test::temp_dir("upgrade_straight");
  r.run(straight, false);
  const std::string new_key = "label_smoothing";  // stands for a key the run's version did not have
  for (const bool legacy : {false, true}) {
    SCOPED_TRACE(legacy ? "hash-only checkpoint" : "checkpoint with its settings");
    const auto dir = test::temp_dir(legacy ? "upgrade_legacy" : "upgrade_settings");
    r.stop_after_4(dir);
    const auto path = dir / Trainer::kCheckpoint;
    const safetensors::Contents ckpt = read_checkpoint(path);
    json settings = json::parse(ckpt.metadata.at("settings"));
    ASSERT_TRUE(settings.contains(new_key));
    settings.erase(new_key);
    safetensors::Metadata metadata = ckpt.metadata;
    if (legacy) {  // what the previous release wrote: config.json without the key, and the hash over it
      json document = json::parse(read_file(dir / Trainer::kConfig));
      document.erase(new_key);
      write_file_atomic(dir / Trainer::kConfig, document.dump(2));
      const std::string text = settings.dump() + "|" + metadata.at("base_fingerprint");
      char hex[17];
      std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(hash_bytes(text.data(), text.size(), 7)));
      metadata = {{"progress", ckpt.metadata.at("progress")}, {"resume_fingerprint", hex}};
    } else {
      metadata["settings"] = settings.dump();
    }
    write_checkpoint(path, ckpt.tensors, metadata);
    const std::string checkpoint = bytes_of(path), config = bytes_of(dir / Trainer::kConfig);
    r.settings[new_key] = 0.1;
    EXPECT_THROW_WITH(r.run(dir, true), InputError,
                      "label_smoothing (new since the run began; its default 0.0 resumes it) vs 0.1");
    r.settings.erase(new_key);
    write_file_atomic(path, checkpoint);
    write_file_atomic(dir / Trainer::kConfig, config);
    r.run(dir, true);
    EXPECT_EQ(bytes_of(straight / Trainer::kLastAdapter / kAdapterWeightsName),
              bytes_of(dir / Trainer::kLastAdapter / kAdapterWeightsName));
  }
}

// LoRA-FA through the loop: A stays at its seeded start (not trained, no optimiser state, no weight decay), B
// trains, and a stopped run resumes to the uninterrupted adapter (A rebuilt from the seed, not from the checkpoint).
TEST(Training, LoraFaKeepsAAtItsStartThroughTrainingAndResume) {
  StoppedRun r;
  r.settings["lora"] = {{"variant", "lora_fa"}};
  r.settings["optim"] = {{"weight_decay", 0.5}};
  const auto straight = test::temp_dir("lora_fa_straight"), dir = test::temp_dir("lora_fa_resumed");
  r.run(straight, false);
  r.stop_after_4(dir);
  const auto ckpt = read_checkpoint(dir / Trainer::kCheckpoint);
  for (const auto& [name, tensor] : ckpt.tensors) EXPECT_EQ(name.find(".A"), std::string::npos) << name;
  r.run(dir, true);
  EXPECT_EQ(bytes_of(straight / Trainer::kLastAdapter / kAdapterWeightsName),
            bytes_of(dir / Trainer::kLastAdapter / kAdapterWeightsName));

  const auto start = make_model(make_config(test::temp_dir("lora_fa_start"), r.settings), 3);
  const Adapter trained = load_adapter(straight / Trainer::kLastAdapter);
  EXPECT_EQ(trained.lora.variant, "lora_fa");
  ASSERT_EQ(trained.targets.size(), start->adapters().size());
  for (size_t i = 0; i < trained.targets.size(); ++i) {
    SCOPED_TRACE(trained.targets[i].describe());
    EXPECT_TRUE(at::equal(trained.targets[i].tensors[0], start->adapters()[i].tensors[0])) << "A as seeded";
    EXPECT_GT(trained.targets[i].tensors[1].abs().max().item<float>(), 0.0f) << "B trained from zero";
  }
}

// PiSSA through the loop: the start is taken from the base again on resume (the same rows, so the same A0 and B0),
// the resumed run ends with the uninterrupted adapter, and the file is a rank-2r LoRA on the unmodified base.
TEST(Training, PissaResumesToTheUninterruptedAdapter) {
  StoppedRun r;
  r.settings["lora"] = {{"init", "pissa"}};
  const auto straight = test::temp_dir("pissa_straight"), dir = test::temp_dir("pissa_resumed");
  r.run(straight, false);
  r.stop_after_4(dir);
  r.run(dir, true);
  EXPECT_EQ(bytes_of(straight / Trainer::kLastAdapter / kAdapterWeightsName),
            bytes_of(dir / Trainer::kLastAdapter / kAdapterWeightsName));
  const Adapter trained = load_adapter(straight / Trainer::kLastAdapter);
  const auto start = make_model(make_config(test::temp_dir("pissa_start"), r.settings), 3);
  ASSERT_EQ(trained.targets.size(), start->adapters().size());
  for (size_t i = 0; i < trained.targets.size(); ++i) {
    const LoraTarget& t = trained.targets[i];
    EXPECT_EQ(t.rank, 2 * start->adapters()[i].rank) << t.describe();
    EXPECT_TRUE(at::equal(t.A().narrow(0, t.rank / 2, t.rank / 2), start->adapters()[i].taken_A)) << "A0 as taken";
  }
}

// SSF through the loop: scale and shift train (both move off their start), a stopped run resumes to the
// uninterrupted adapter, and the file says ssf.
TEST(Training, SsfTrainsScaleAndShiftAndResumesToTheUninterruptedAdapter) {
  StoppedRun r;
  r.settings["lora"] = {{"variant", "ssf"}};
  const auto straight = test::temp_dir("ssf_straight"), dir = test::temp_dir("ssf_resumed");
  r.run(straight, false);
  r.stop_after_4(dir);
  r.run(dir, true);
  EXPECT_EQ(bytes_of(straight / Trainer::kLastAdapter / kAdapterWeightsName),
            bytes_of(dir / Trainer::kLastAdapter / kAdapterWeightsName));
  const auto start = make_model(make_config(test::temp_dir("ssf_start"), r.settings), 3);
  const Adapter trained = load_adapter(straight / Trainer::kLastAdapter);
  EXPECT_EQ(trained.lora.variant, "ssf");
  ASSERT_EQ(trained.targets.size(), start->adapters().size());
  for (size_t i = 0; i < trained.targets.size(); ++i)
    for (size_t k = 0; k < 2; ++k) {
      SCOPED_TRACE(trained.targets[i].describe() + (k == 0 ? " scale" : " shift"));
      const at::Tensor moved = trained.targets[i].tensors[k] - start->adapters()[i].tensors[k];
      EXPECT_GT(moved.abs().max().item<float>(), 1e-4f);
    }
}

// VPT through the loop, shallow and deep: only the prompts and the head train (every block runs with gradients:
// no frozen prefix), and a stopped run resumes to the uninterrupted prompts.
TEST(Training, VptTrainsPromptsAndResumesToTheUninterruptedAdapter) {
  for (const bool deep : {false, true}) {
    SCOPED_TRACE(deep ? "deep" : "shallow");
    StoppedRun r;
    r.settings["method"] = "vpt";
    r.settings["vpt"] = {{"tokens", 2}, {"deep", deep}};
    const std::string kind = deep ? "deep" : "shallow";
    const auto straight = test::temp_dir("vpt_straight_" + kind), dir = test::temp_dir("vpt_resumed_" + kind);
    r.run(straight, false);
    r.stop_after_4(dir);
    r.run(dir, true);
    EXPECT_EQ(bytes_of(straight / Trainer::kLastAdapter / kAdapterWeightsName),
              bytes_of(dir / Trainer::kLastAdapter / kAdapterWeightsName));
    const auto start = make_model(make_config(test::temp_dir("vpt_start_" + kind), r.settings), 3);
    EXPECT_EQ(start->blocks().frozen_prefix(), 0);
    EXPECT_EQ(start->trainable().size(), start->prompts().sets().size() + 2);
    const Adapter trained = load_adapter(straight / Trainer::kLastAdapter);
    ASSERT_EQ(trained.method, Method::kVpt);
    ASSERT_EQ(trained.prompt_sets.size(), start->prompts().sets().size());
    for (size_t i = 0; i < trained.prompt_sets.size(); ++i)
      EXPECT_GT((trained.prompt_sets[i] - start->prompts().sets()[i]).abs().max().item<float>(), 1e-4f) << i;
  }
}

// AdaptFormer through the loop: only the adapters and the head train, Up moves off its zero start, and a stopped run
// resumes to the uninterrupted adapters.
TEST(Training, AdaptFormerTrainsAndResumesToTheUninterruptedAdapter) {
  StoppedRun r;
  r.settings["method"] = "adaptformer";
  r.settings["adaptformer"] = {{"bottleneck", 4}};
  const auto straight = test::temp_dir("adaptformer_straight"), dir = test::temp_dir("adaptformer_resumed");
  r.run(straight, false);
  r.stop_after_4(dir);
  r.run(dir, true);
  EXPECT_EQ(bytes_of(straight / Trainer::kLastAdapter / kAdapterWeightsName),
            bytes_of(dir / Trainer::kLastAdapter / kAdapterWeightsName));
  const auto start = make_model(make_config(test::temp_dir("adaptformer_start"), r.settings), 3);
  EXPECT_EQ(start->trainable().size(), 4 * static_cast<size_t>(start->blocks().size()) + 2);
  const Adapter trained = load_adapter(straight / Trainer::kLastAdapter);
  ASSERT_EQ(trained.method, Method::kAdaptFormer);
  ASSERT_EQ(trained.mlp_adapters.size(), static_cast<size_t>(start->blocks().size()));
  for (const auto& block : trained.mlp_adapters) EXPECT_GT(block[2].abs().max().item<float>(), 0.0f) << "Up trained";
}

TEST(Training, AdaptersRecordFileNamesNotTheOwnersFolders) {
  StoppedRun r;
  r.settings["data"] = {{"train", "/home/someone/private/photos/train/"}, {"val", "/home/someone/private/val"}};
  const auto dir = test::temp_dir("record_names");
  r.run(dir, false);
  const auto meta = safetensors::read(dir / Trainer::kLastAdapter / kAdapterWeightsName).metadata;
  const json training = json::parse(meta.at("loratune")).at("training");
  EXPECT_EQ(training.at("model"), "hf_script.pt");
  EXPECT_EQ(training.at("data").at("train"), "train");
  EXPECT_EQ(training.at("data").at("val"), "val");
  EXPECT_EQ(meta.at("loratune").find("/home/someone"), std::string::npos);
}

TEST(Fuzz, CheckpointResumeTurnsEveryMutationIntoAnInputError) {
  StoppedRun r;
  r.settings["max_steps"] = 5;  // a mutation that resumed would train one step
  const auto dir = test::temp_dir("fuzz_checkpoint");
  r.stop_after_4(dir);
  const auto path = dir / Trainer::kCheckpoint;
  const std::string original = bytes_of(path);
  const safetensors::Contents good = read_checkpoint(path);
  int same_contents = 0;  // mutations that only touched bytes without meaning (header padding, JSON whitespace)
  const test::FuzzCount count = test::fuzz(original, path, 400, 20.0, [&] {
    const safetensors::Contents mutated = read_checkpoint(path);
    bool same = mutated.metadata == good.metadata && mutated.tensors.size() == good.tensors.size();
    for (const auto& [name, t] : good.tensors)
      same = same && mutated.tensors.count(name) && mutated.tensors.at(name).equal(t);
    same_contents += same;
    r.run(dir, true);
  });
  EXPECT_GT(count.mutations, 20);
  EXPECT_EQ(count.loaded, same_contents) << "a checkpoint that differs in anything that matters is refused";
  write_file_atomic(path, original);
  EXPECT_EQ(r.run(dir, true).steps, 5);
}

TEST(Training, PersistentNanLossStopsWithAHint) {
  ToyData data(8, 5);
  data.images[0].fill_(std::nan(""));  // every batch of 8 holds this image
  const TrainConfig c = make_config(test::temp_dir("nan"), {{"batch_size", 8}, {"epochs", 5}});
  auto model = make_model(c, 3);
  const at::Tensor before = model->head().weight().detach().clone();
  TensorBatchSource train(data.images, data.labels, 8, true, true, 0);
  EXPECT_THROW_WITH(Trainer(c, *model, train, nullptr, {"a", "b", "c"}, c10::Device(c10::kCPU), Precision::kFp32).run(false),
                    RuntimeFailure, "the loss was NaN/inf for 3 steps in a row (at step 3): the learning rate");
  EXPECT_TRUE(at::equal(before, model->head().weight())) << "steps with NaN gradients are skipped";
}

// Cached embeddings (contrastive.negatives step) give the gradients of the whole batch at once, in float64: two
// linear towers with dropout (the second pass must draw the first pass's masks), micro-batches of 3, 2 and 3 rows,
// rows of one group not each other's negatives, and the loss scale and weight passed through.
TEST(ContrastiveLoss, CachedMicroBatchesEqualTheWholeBatchInFloat64) {
  at::manual_seed(5);
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  const at::Tensor x = at::randn({8, 6}, f64), y = at::randn({8, 5}, f64);
  const at::Tensor groups = at::tensor({0, 1, 2, 0, 3, 4, 1, 5}, at::kLong);
  const std::vector<std::pair<int64_t, int64_t>> parts = {{0, 3}, {3, 2}, {5, 3}};
  const double weight = 0.75;
  const auto run = [&](bool cached) {
    at::manual_seed(11);  // the same towers and dropout draws in both runs
    const at::Tensor w_image = at::randn({6, 4}, f64).requires_grad_(), w_text = at::randn({5, 4}, f64).requires_grad_();
    const auto embed = [&](int64_t k) {
      const auto [begin, n] = parts[static_cast<size_t>(k)];
      return PairedFeatures{at::dropout(x.narrow(0, begin, n), 0.3, true).matmul(w_image),
                            at::dropout(y.narrow(0, begin, n), 0.3, true).matmul(w_text)};
    };
    const LossScaler scaler(true, {});
    double loss = 0;
    if (cached) {
      loss = backward_contrastive_cached(3, embed, 7.0, groups, weight, scaler, c10::Device(c10::kCPU));
    } else {  // the draws of the micro-batches in order, then one loss over all rows
      std::vector<at::Tensor> images, texts;
      for (int64_t k = 0; k < 3; ++k) {
        const PairedFeatures f = embed(k);
        images.push_back(f.image);
        texts.push_back(f.text);
      }
      const at::Tensor whole = contrastive_loss(at::cat(images), at::cat(texts), 7.0, groups);
      scaler.scale_loss(whole * weight).backward();
      loss = whole.item<double>() * weight;
    }
    return std::make_tuple(loss, w_image.grad(), w_text.grad());
  };
  const auto [cached_loss, cached_image, cached_text] = run(true);
  const auto [whole_loss, whole_image, whole_text] = run(false);
  EXPECT_NEAR(cached_loss, whole_loss, 1e-12);
  EXPECT_LT(max_abs_diff(cached_image, whole_image), 1e-9 * whole_image.abs().max().item<double>());
  EXPECT_LT(max_abs_diff(cached_text, whole_text), 1e-9 * whole_text.abs().max().item<double>());
  EXPECT_GT(whole_image.abs().max().item<double>(), 1.0);  // scaled by the loss scale (65536): not vanishing
}

TEST(LossScaler, InfSkipsAndHalvesThenGrowsAfterTheInterval) {
  LossScaler::Options o;
  o.init_scale = 1024;
  o.growth_interval = 3;
  LossScaler scaler(true, o);
  EXPECT_EQ(scaler.scale_loss(at::tensor(2.0)).item<double>(), 2048.0);
  at::Tensor finite = at::full({3}, 1024.0), broken = at::tensor({1.0, INFINITY});
  EXPECT_TRUE(scaler.unscale({finite}));
  EXPECT_TRUE(at::allclose(finite, at::ones({3}))) << "gradients are unscaled in place";
  EXPECT_FALSE(scaler.unscale({finite, broken}));
  scaler.update(true);
  EXPECT_EQ(scaler.scale(), 512.0);
  EXPECT_EQ(scaler.growth_tracker(), 0);
  scaler.update(false);
  scaler.update(false);
  EXPECT_EQ(scaler.scale(), 512.0);
  scaler.update(false);
  EXPECT_EQ(scaler.scale(), 1024.0);
  EXPECT_EQ(scaler.growth_tracker(), 0);
  LossScaler off(false, o);
  EXPECT_EQ(off.scale_loss(at::tensor(2.0)).item<double>(), 2.0);
}

TEST(Optimizer, AdamWMatchesPyTorch) {
  const auto ref = safetensors::read(fixture("models/adamw_ref.safetensors")).tensors;
  at::Tensor w = ref.at("w0").clone().requires_grad_(true), b = ref.at("b0").clone().requires_grad_(true);
  AdamW opt({{"w", w}, {"b", b}}, AdamWOptions{0.9, 0.99, 1e-8, 0.1});  // decay applies to the matrix only
  const double lrs[] = {0.01, 0.005, 0.002};
  for (int i = 0; i < 3; ++i) {
    w.mutable_grad() = ref.at("gw" + std::to_string(i)).clone();
    b.mutable_grad() = ref.at("gb" + std::to_string(i)).clone();
    opt.step(lrs[i]);
  }
  EXPECT_LT(max_abs_diff(w, ref.at("w3")), 1e-6);
  EXPECT_LT(max_abs_diff(b, ref.at("b3")), 1e-6);
}

// The flat groups' bookkeeping: tensors of mixed shapes, decay and learning-rate multipliers in shared buffers
// end where each alone in its own optimiser ends, their gradients are views of the flat buffers, and the
// checkpoint state keeps one entry per tensor.
TEST(Optimizer, FlatGroupsGiveEachTensorItsOwnUpdate) {
  at::manual_seed(3);
  const std::vector<std::vector<int64_t>> shapes = {{4, 3}, {5}, {2, 6}, {7}, {3, 3}};
  std::vector<NamedTensor> together, alone;
  for (size_t i = 0; i < shapes.size(); ++i) {
    const at::Tensor init = at::randn(shapes[i]);
    together.push_back({"t" + std::to_string(i), init.clone().requires_grad_(true)});
    alone.push_back({"t" + std::to_string(i), init.clone().requires_grad_(true)});
  }
  const AdamWOptions options{0.9, 0.99, 1e-8, 0.1};
  AdamW flat(together, options);
  for (size_t i = 0; i < shapes.size(); ++i)
    EXPECT_TRUE(at::equal(together[i].tensor, alone[i].tensor)) << "regrouping moves values exactly, tensor " << i;
  std::vector<std::unique_ptr<AdamW>> single;
  for (size_t i = 0; i < alone.size(); ++i) {
    single.push_back(std::make_unique<AdamW>(std::vector<NamedTensor>{alone[i]}, options));
    if (i % 3 == 0) single.back()->set_lr_multiplier(alone[i].name, 4.0);
    if (i % 3 == 0) flat.set_lr_multiplier(together[i].name, 4.0);
  }
  for (int step = 0; step < 3; ++step) {
    for (size_t i = 0; i < shapes.size(); ++i) {
      const at::Tensor g = at::randn(shapes[i]);
      together[i].tensor.mutable_grad() = g.clone();
      alone[i].tensor.mutable_grad() = g.clone();
    }
    flat.step(0.01);
    for (auto& s : single) s->step(0.01);
  }
  const std::vector<at::Tensor> buffers = flat.gradients();
  EXPECT_EQ(buffers.size(), 4u) << "groups: (decay, x4), (decay, x1), (no decay, x4), (no decay, x1)";
  for (size_t i = 0; i < shapes.size(); ++i) {
    // Equal up to the last bit a vectorised loop's tail may round differently.
    EXPECT_LT(max_abs_diff(together[i].tensor, alone[i].tensor), 1e-6) << i;
    const at::Tensor& g = together[i].tensor.grad();
    EXPECT_TRUE(std::any_of(buffers.begin(), buffers.end(), [&](const at::Tensor& f) {
      return g.data_ptr() >= f.data_ptr() && g.data_ptr() < static_cast<char*>(f.data_ptr()) + f.nbytes();
    })) << "the gradient of tensor " << i << " is a view of a flat buffer";
  }
  EXPECT_EQ(flat.state().size(), 2 * shapes.size() + 1);
}

TEST(Optimizer, WarmupThenCosine) {
  EXPECT_DOUBLE_EQ(scheduled_lr(0, 100, 10, 1.0, 0.0), 0.1);
  EXPECT_DOUBLE_EQ(scheduled_lr(9, 100, 10, 1.0, 0.0), 1.0);
  EXPECT_DOUBLE_EQ(scheduled_lr(10, 100, 10, 1.0, 0.0), 1.0);
  EXPECT_NEAR(scheduled_lr(55, 100, 10, 1.0, 0.0), 0.5, 1e-12);
  EXPECT_NEAR(scheduled_lr(100, 100, 10, 1.0, 0.1), 0.1, 1e-12);
}

TEST(Config, DefaultsTypesAndSuggestions) {
  const TrainConfig c = parse_train_config({{"model", "m.pt"}, {"data", {{"train", "photos"}}}}, "c.json");
  EXPECT_EQ(c.lora.rank, 8);
  EXPECT_EQ(c.method, Method::kLora);
  EXPECT_EQ(config_json(c)["optim"]["lr"], 1e-3);
  EXPECT_THROW_WITH(parse_train_config({{"model", "m"}, {"data", {{"train", "p"}}}, {"lora", {{"rnak", 4}}}}, "c.json"),
                    InputError, "c.json: unknown key \"lora.rnak\" (did you mean \"lora.rank\"?)");
  EXPECT_THROW_WITH(parse_train_config({{"model", "m"}, {"data", {{"train", "p"}}}, {"learning_rate", 1}}, "c.json"),
                    InputError, "unknown key \"learning_rate\"");
  EXPECT_THROW_WITH(parse_train_config({{"model", "m"}, {"data", {{"train", "p"}}}, {"lora", {{"rank", "8"}}}}, "c.json"),
                    InputError, "c.json: lora.rank must be an integer, not \"8\"");
  EXPECT_THROW_WITH(parse_train_config({{"model", "m"}, {"data", {{"train", "p"}}}, {"method", "lorra"}}, "c.json"),
                    InputError, "method must be lora, full, linear_probe, vpt or adaptformer");
  EXPECT_THROW_WITH(parse_train_config({{"data", {{"train", "p"}}}}, "c.json"), InputError, "\"model\" is required");
  const auto dir = test::temp_dir("config");
  write_file_atomic(dir / "c.json", R"({"model": "m.pt", "data": {"train": "p"}, "lora": {"rank": 4}})");
  const TrainConfig o = load_train_config(dir / "c.json", {"lora.rank=16", "data.val=null", "output_dir=runs/x", "optim.head_lr=0.01"});
  EXPECT_EQ(o.lora.rank, 16);
  EXPECT_EQ(o.output_dir, "runs/x");
  EXPECT_DOUBLE_EQ(o.optim.head_lr, 0.01);
  EXPECT_THROW_WITH(load_train_config(dir / "c.json", {"lora.rank"}), InputError, "expected key=value");
}

// Every key read from a document lands in the struct and comes back out of it unchanged (each key's two-way
// binding names one member), and the defaults are the structs' initial values.
TEST(Config, EveryKeyRoundTripsThroughTheStructAndDefaultsAreTheStructs) {
  const json document = json::parse(R"({
    "model": "/m.pt", "data": {"train": "/p", "val": "/v", "val_fraction": 0.2, "split_seed": 3, "workers": 2,
      "prefetch_batches": 5, "cache": "memory", "prefix_cache": "off", "max_image_pixels": 7,
      "augment": {"enabled": false, "scale": [0.5, 0.9], "ratio": [0.5, 2.0], "hflip": false}, "captions": null,
      "caption_column": "caption"},
    "method": "full", "lora": {"rank": 4, "alpha": 3.5, "dropout": 0.25, "rslora": true, "variant": "dora", "init": "olora",
      "targets": ["qkv:q"], "text_targets": ["q_proj"], "last_blocks": 2, "rank_pattern": {"a": 2},
      "alpha_pattern": {"b": 1.5}},
    "vpt": {"tokens": 5, "deep": false}, "adaptformer": {"bottleneck": 7, "scale": 0.25, "sequential": true},
    "head": {"init": "zero_shot", "text_model": "/t.pt", "class_names": "/n.json", "templates": ["a {}"]},
    "optim": {"lr": 0.02, "head_lr": 0.03, "weight_decay": 0.5, "betas": [0.8, 0.9], "eps": 1e-6, "grad_clip": 2.0,
      "lora_plus_ratio": null},
    "schedule": {"warmup_fraction": 0.2, "min_lr_ratio": 0.1}, "batch_size": 3, "grad_accum_steps": 2, "epochs": 4,
    "max_steps": 9, "loss": "cross_entropy", "contrastive": {"negatives": "micro_batch"}, "label_smoothing": 0.1, "precision": "bf16", "frozen_dtype": "compute",
    "gradient_checkpointing": false, "offload": "none", "loss_scale": {"init": 128.0, "growth_interval": 7},
    "early_stopping": {"patience": 2}, "device": "cpu", "threads": 3, "seed": 11, "output_dir": "/o",
    "eval_every_epochs": 2, "checkpoint_every_steps": 5, "log_every_steps": 6})");
  const json defaults = default_config_json(), flat = document.flatten(), flat_defaults = defaults.flatten();
  ASSERT_EQ(flat.size(), flat_defaults.size()) << "the document sets every key";
  for (const auto& [key, value] : flat.items())  // loss and offload: other values need other keys
    if (!value.is_null() && key != "/loss" && key != "/offload")
      EXPECT_NE(value, flat_defaults.value(key, json())) << key << ": the document differs from the default";
  EXPECT_EQ(config_json(parse_train_config(document, "doc")), document);

  const TrainConfig in_code;
  EXPECT_EQ(defaults["lora"]["dropout"], in_code.lora.dropout);
  EXPECT_EQ(defaults["lora"]["dropout"], LoraSettings{}.dropout) << "LoraSettings' default is the config's";
  EXPECT_EQ(defaults["data"]["augment"]["ratio"][1], AugmentConfig{}.ratio_max);
  EXPECT_TRUE(defaults["optim"]["head_lr"].is_null()) << "not set";
  EXPECT_EQ(defaults["threads"], "auto");
}

// A config filled in code gets the checks a file gets (public), and what Trainer writes is that config.
TEST(Config, ConfigsFilledInCodeAreChecked) {
  TrainConfig c;
  EXPECT_THROW_WITH(check_train_config(c), InputError, "\"model\" is required");
  c.model = "m.pt";
  c.data.train = "photos";
  check_train_config(c);
  c.lora.dropout = 1.5;
  EXPECT_THROW_WITH(check_train_config(c), InputError, "lora.dropout must be in [0, 1) (got 1.5)");
  c.lora.dropout = 0.0;
  c.method = Method::kFull;
  c.frozen_dtype = FrozenStorage::kNf4;
  EXPECT_THROW_WITH(check_train_config(c), InputError, "frozen_dtype nf4 quantises the frozen base");
  c.method = Method::kLora;
  c.precision = "fp8";
  EXPECT_THROW_WITH(check_train_config(c), InputError, "precision must be");
}

// The tuner against a simulated machine: `others` cores busy elsewhere, and a step time per thread count.
struct SimulatedMachine {
  double others = 0;
  std::map<int, double> seconds;  // by thread count
  int units_at_worse = 0;         // steps run at a count slower than the best
  ThreadTuner::Options options() {
    ThreadTuner::Options o;
    o.start = available_cores();
    o.load = [this](double& busy, double& own, double& idle) {
      busy = others;
      own = at::get_num_threads();
      idle = std::max(0.0, available_cores() - others - own);
      return true;
    };
    return o;
  }
  void run(ThreadTuner& tuner, int steps) {
    double best = 1e30;
    for (const auto& [n, t] : seconds) best = std::min(best, t);
    for (int i = 0; i < steps; ++i) {
      const double t = seconds.at(at::get_num_threads());
      units_at_worse += t > best;
      tuner.record(t, 1);
    }
  }
};

TEST(ThreadTuner, FollowsTheLoadAndNeverProbesOnAQuietMachine) {
  const int cores = available_cores();
  if (cores < 2) GTEST_SKIP() << "needs two cores";
  SimulatedMachine m;
  for (int n = 1; n <= cores; ++n) m.seconds[n] = 1.0 / n;  // quiet: each thread helps
  ThreadTuner tuner(kAutoThreads, m.options());
  m.run(tuner, 1000);
  EXPECT_EQ(tuner.history(), std::vector<int>{cores}) << "quiet and at every core: nothing to try";
  EXPECT_EQ(m.units_at_worse, 0);

  // Busy processes on every core: all threads wait for descheduled ones (measured 20-40x), one thread is fastest.
  m.others = cores;
  for (int n = 2; n <= cores; ++n) m.seconds[n] = 20.0;
  m.seconds[1] = 1.0;
  m.units_at_worse = 0;
  m.run(tuner, 2000);
  EXPECT_EQ(tuner.threads(), 1);
  EXPECT_LT(m.units_at_worse, 60) << "steps at a slower count while finding and keeping 1 (of 2000)";

  // The load goes: back to every core.
  m.others = 0;
  for (int n = 1; n <= cores; ++n) m.seconds[n] = 1.0 / n;
  m.run(tuner, 200);
  EXPECT_EQ(tuner.threads(), cores);

  ThreadTuner pinned(1, m.options());
  m.others = cores;
  m.run(pinned, 100);
  EXPECT_EQ(pinned.history(), std::vector<int>{1});
  EXPECT_EQ(parse_threads("auto"), kAutoThreads);
  EXPECT_EQ(parse_threads("3"), 3);
  EXPECT_THROW_WITH(parse_threads("many"), InputError, "threads must be auto or a count");
}

TEST(Config, ValuesThatWouldOverflowOrExhaustTheMachineAreRefused) {
  const auto dir = test::temp_dir("bounds");
  const std::pair<json, const char*> cases[] = {
      {{{"optim", {{"eps", 0}}}}, "optim.eps must be positive (got 0)"},
      {{{"optim", {{"head_lr", -1}}}}, "optim.head_lr must be positive (got -1)"},
      {{{"batch_size", int64_t{1} << 62}}, "batch_size must be in [1, 65536]"},
      {{{"grad_accum_steps", int64_t{1} << 62}}, "grad_accum_steps must be in [1, 65536]"},
      {{{"threads", 100000}}, "threads must be in [0, 4096]"},
  };
  for (const auto& [patch, message] : cases) EXPECT_THROW_WITH(make_config(dir, patch), InputError, message);
}

TEST(Config, KeyRecordsHoldTheRulesAndTheHelpSaysThem) {
  const nlohmann::json base = {{"model", "m"}, {"data", {{"train", "p"}}}};
  auto with = [&](const nlohmann::json& patch) {
    nlohmann::json j = base;
    j.merge_patch(patch);
    return parse_train_config(j, "c.json");
  };
  EXPECT_THROW_WITH(with({{"data", {{"workers", -1}}}}), InputError, "c.json: data.workers must be at least 0 (got -1)");
  EXPECT_THROW_WITH(with({{"data", {{"cache", "disk"}}}}), InputError,
                    "c.json: data.cache must be auto, memory or off (got \"disk\")");
  EXPECT_THROW_WITH(with({{"optim", {{"betas", {0.9, 1.0}}}}}), InputError, "optim.betas entries must be in [0, 1) (got 1.0)");
  EXPECT_THROW_WITH(with({{"lora", {{"rank_pattern", {{"query", 0}}}}}}), InputError,
                    "lora.rank_pattern values must be at least 1 (got 0)");
  EXPECT_THROW_WITH(with({{"lora", {{"variant", "vera"}}}}), InputError, "lora.variant must be lora, dora, lora_fa or ssf (got \"vera\")");
  EXPECT_THROW_WITH(with({{"lora", {{"init", "eva"}}}}), InputError,
                    "lora.init must be kaiming_uniform, gaussian, pissa or olora (got \"eva\")");
  EXPECT_THROW_WITH(with({{"schedule", {{"min_lr_ratio", 1.5}}}}), InputError, "schedule.min_lr_ratio must be in [0, 1]");
  EXPECT_NO_THROW(with({{"seed", -3}}));  // seeds have no range
  // The LoRA rules are the same ones a target list and an adapter file are checked with (test_untrusted_input).
  EXPECT_THROW_WITH(with({{"lora", {{"dropout", 1.5}}}}), InputError, "c.json: lora.dropout must be in [0, 1) (got 1.5)");
  LoraSettings settings;
  settings.dropout = 1.5;
  EXPECT_THROW_WITH(check_lora_settings(settings, "x"), InputError, "x: lora.dropout must be in [0, 1) (got 1.5)");
  // --help-config is made from the records: the variant registry's names, each range.
  const std::string help = config_reference();
  EXPECT_NE(help.find("one of: lora | dora"), std::string::npos) << help;
  EXPECT_NE(help.find("one of: kaiming_uniform | gaussian | pissa | olora"), std::string::npos);
  EXPECT_NE(help.find("pissa: A and B from the r largest singular values"), std::string::npos);
  EXPECT_NE(help.find("one of: lora | full | linear_probe"), std::string::npos);
  EXPECT_NE(help.find("one of: auto | fp32 | bf16 | fp16"), std::string::npos);
  EXPECT_NE(help.find("each in [0, 1)"), std::string::npos);
}

}  // namespace
}  // namespace loratune
