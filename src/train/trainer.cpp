#include "loratune/trainer.h"

#include <spdlog/spdlog.h>

#include <chrono>
#include <cmath>
#include <fstream>
#include <limits>

#include "common/torch_compat.h"
#include "loratune/adapter_binding.h"
#include "loratune/errors.h"
#include "loratune/files.h"
#include "loratune/fingerprint.h"
#include "loratune/memory.h"
#include "loratune/metrics.h"
#include "loratune/optim.h"
#include "loratune/progress.h"
#include "loratune/safetensors.h"
#include "loratune/strings.h"
#include "loratune/train_step.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace loratune {
namespace {

std::atomic<bool> g_stop_requested{false};

constexpr int64_t kMaxNonFiniteSteps = 3;       // fp32/bf16: NaN/inf this many steps in a row stops the run
constexpr int64_t kMaxNonFiniteStepsFp16 = 25;  // fp16: the scaler may need a few halvings first
constexpr const char* kCheckpointFormat = "loratune.checkpoint/1";

std::string format_percent(double fraction) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2f%%", 100.0 * fraction);
  return buf;
}

}  // namespace

json TrainSummary::to_json() const {
  json skipped = json::array();
  for (const auto& [path, why] : skipped_files) skipped.push_back({{"path", path}, {"reason", why}});
  return {{"method", method},
          {"steps", steps},
          {"epochs", epochs},
          {"images_seen", images_seen},
          {"trainable_params", trainable_params},
          {"total_params", total_params},
          {"best_val_top1", best_val_top1},
          {"best_epoch", best_epoch},
          {"final_val_top1", final_val_top1},
          {"final_val_loss", final_val_loss},
          {"final_train_loss", final_train_loss},
          {"peak_memory_bytes", peak_memory},
          {"seconds", seconds},
          {"train_images_per_second", train_images_per_second},
          {"precision", precision},
          {"skipped_files", skipped}};
}

void Trainer::request_stop() { g_stop_requested = true; }

Trainer::Trainer(const TrainConfig& config, Model& model, BatchSource& train, BatchSource* val,
                 std::vector<std::string> classes, const c10::Device& device, Precision precision, TrainerHooks hooks)
    : config_(config), model_(model), train_(train), val_(val), classes_(std::move(classes)), device_(device),
      precision_(precision), hooks_(std::move(hooks)), dir_(config.output_dir), trainable_(model.trainable()) {
  optimizer_ = std::make_unique<AdamW>(trainable_, AdamWOptions{config.optim.beta1, config.optim.beta2, config.optim.eps, config.optim.weight_decay});
  if (config.optim.head_lr > 0) {
    optimizer_->set_lr_multiplier("head.weight", config.optim.head_lr / config.optim.lr);
    optimizer_->set_lr_multiplier("head.bias", config.optim.head_lr / config.optim.lr);
  }
  LossScaler::Options so;
  so.init_scale = config.loss_scale.init;
  so.growth_interval = config.loss_scale.growth_interval;
  scaler_ = std::make_unique<LossScaler>(precision == Precision::kFp16, so);
}

Trainer::~Trainer() = default;

json Trainer::adapter_training_record() const {
  json record = result_settings(config_.json);
  record["precision"] = precision_name(precision_);
  return record;
}

std::string Trainer::resume_fingerprint() const {
  const std::string text = adapter_training_record().dump() + "|" + model_.bundle().fingerprint;
  char hex[17];
  std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(hash_bytes(text.data(), text.size(), 7)));
  return hex;
}

void Trainer::save_adapter_to(const std::string& name) {
  save_adapter(dir_ / name, adapter_from_model(model_, classes_, adapter_training_record()));
}

void Trainer::append_metrics(const json& line, Progress& p) {
  std::ofstream out(dir_ / kMetrics, std::ios::app);
  out << line.dump(-1, ' ', false, json::error_handler_t::replace) << "\n";
  out.flush();
  if (!out) throw RuntimeFailure("cannot write " + (dir_ / kMetrics).string() + " (disk full?)");
  ++p.metrics_lines;
}

void Trainer::save_checkpoint(const Progress& p) {
  safetensors::Tensors tensors = optimizer_->state();
  for (const auto& t : trainable_) tensors["param." + t.name] = t.tensor;
  tensors["rng.cpu"] = compat::default_generator(c10::Device(c10::kCPU)).get_state();
  if (device_.is_cuda()) tensors["rng.device"] = compat::default_generator(device_).get_state();
  const json progress = {{"step", p.step},
                         {"epoch", p.epoch},
                         {"step_in_epoch", p.step_in_epoch},
                         {"metrics_lines", p.metrics_lines},
                         {"nonfinite_streak", p.nonfinite_streak},
                         {"best_top1", p.best_top1},
                         {"best_epoch", p.best_epoch},
                         {"loss_scale", scaler_->scale()},
                         {"loss_scale_growth_tracker", scaler_->growth_tracker()}};
  safetensors::write(dir_ / kCheckpoint, tensors,
                     {{"format", kCheckpointFormat}, {"progress", progress.dump()}, {"resume_fingerprint", resume_fingerprint()}});
}

Trainer::Progress Trainer::load_checkpoint() {
  const fs::path path = dir_ / kCheckpoint;
  const auto ckpt = safetensors::read(path);
  if (ckpt.metadata.count("format") == 0 || ckpt.metadata.at("format") != kCheckpointFormat)
    throw InputError(path.string() + " is not a loratune checkpoint");
  if (ckpt.metadata.at("resume_fingerprint") != resume_fingerprint())
    throw InputError(path.string() + " was written with another configuration or base model; resuming needs the same "
                     "settings (only output_dir, device, threads, data loading and logging may change). Compare with " +
                     (dir_ / kConfig).string() + ", or start a new run in another output_dir");
  const json progress = json::parse(ckpt.metadata.at("progress"));
  {
    at::NoGradGuard no_grad;
    for (auto& t : trainable_) {
      auto it = ckpt.tensors.find("param." + t.name);
      if (it == ckpt.tensors.end()) throw InputError(path.string() + " has no tensor for " + t.name);
      t.tensor.copy_(it->second);
    }
  }
  optimizer_->load_state(ckpt.tensors);
  compat::default_generator(c10::Device(c10::kCPU)).set_state(ckpt.tensors.at("rng.cpu"));
  if (device_.is_cuda() && ckpt.tensors.count("rng.device"))
    compat::default_generator(device_).set_state(ckpt.tensors.at("rng.device"));
  scaler_->restore(progress.at("loss_scale"), progress.at("loss_scale_growth_tracker"));
  Progress p;
  p.step = progress.at("step");
  p.epoch = progress.at("epoch");
  p.step_in_epoch = progress.at("step_in_epoch");
  p.metrics_lines = progress.at("metrics_lines");
  p.nonfinite_streak = progress.at("nonfinite_streak");
  p.best_top1 = progress.at("best_top1");
  p.best_epoch = progress.at("best_epoch");

  // Metrics written after the checkpoint belong to the lost part of the run.
  std::vector<std::string> lines;
  {
    std::ifstream in(dir_ / kMetrics);
    std::string line;
    while (static_cast<int64_t>(lines.size()) < p.metrics_lines && std::getline(in, line)) lines.push_back(line);
  }
  std::string kept;
  for (const auto& line : lines) kept += line + "\n";
  write_file_atomic(dir_ / kMetrics, kept);
  return p;
}

bool Trainer::decide_prefix_cache() const {
  const std::string& mode = config_.data.prefix_cache;
  if (mode == "off" || !model_.has_frozen_prefix() || config_.data.augment.enabled) return false;
  return mode == "memory" || model_.frozen_prefix_blocks() > 0 || model_.method() == Method::kLinearProbe;
}

at::Tensor Trainer::prefix_for(PrefixCache& cache, const Batch& batch) {
  const bool cached = std::all_of(batch.indices.begin(), batch.indices.end(),
                                  [&](int64_t i) { return cache.rows.count(i) > 0; });
  if (cached) {
    std::vector<at::Tensor> rows;
    for (int64_t i : batch.indices) rows.push_back(cache.rows.at(i));
    return at::stack(rows).to(device_, /*non_blocking=*/true);
  }
  at::Tensor h;
  {
    AutocastScope autocast(device_, precision_);
    h = model_.prefix(batch.images.to(device_, /*non_blocking=*/true));
  }
  for (size_t k = 0; k < batch.indices.size(); ++k) cache.rows[batch.indices[k]] = h[static_cast<int64_t>(k)].to(at::kCPU).clone();
  return h;
}

at::Tensor Trainer::forward_logits(const Batch& batch, PrefixCache* cache) {
  if (cache) {
    const at::Tensor h = prefix_for(*cache, batch);
    AutocastScope autocast(device_, precision_);
    return model_.logits_from_prefix(h, config_.gradient_checkpointing);
  }
  AutocastScope autocast(device_, precision_);
  return model_.logits(batch.images.to(device_, /*non_blocking=*/true), config_.gradient_checkpointing);
}

Trainer::Validation Trainer::validate() {
  model_.set_training(false);
  at::NoGradGuard no_grad;
  PrefixCache* cache = use_prefix_cache_ ? &val_cache_ : nullptr;
  if (cache && static_cast<int64_t>(cache->rows.size()) >= val_->num_usable()) val_->set_images_needed(false);
  ProgressBar bar("  validate", val_->num_samples(), "img");
  std::vector<at::Tensor> logits, labels;
  int64_t done = 0;
  val_->start_epoch(0, 0);
  while (auto batch = val_->next()) {
    logits.push_back(forward_logits(*batch, cache).to(at::kCPU, at::kFloat));
    labels.push_back(batch->labels);
    done += static_cast<int64_t>(batch->indices.size());
    bar.update(done, memory_status(device_));
  }
  bar.finish(memory_status(device_));
  const ClassificationMetrics m = compute_metrics(at::cat(logits), at::cat(labels));
  return {m.loss, m.top1};
}

TrainSummary Trainer::run(bool resume) {
  g_stop_requested = false;
  const auto start = std::chrono::steady_clock::now();
  fs::create_directories(dir_);
  remove_stale_temporaries(dir_);
  const bool have_checkpoint = fs::exists(dir_ / kCheckpoint);
  if (resume && !have_checkpoint)
    throw InputError("nothing to resume: " + (dir_ / kCheckpoint).string() + " does not exist; run without --resume");
  if (!resume && have_checkpoint)
    throw InputError(dir_.string() + " already holds a run; continue it with --resume, or set output_dir to a new folder");

  const int64_t accum = config_.grad_accum_steps;
  const int64_t batches_per_epoch = train_.batches_per_epoch();
  if (batches_per_epoch == 0) throw InputError("no training images");
  // The last step of an epoch may have fewer micro-batches, and its last micro-batch fewer images.
  const int64_t steps_per_epoch = (batches_per_epoch + accum - 1) / accum;
  const int64_t images_per_epoch = std::min(batches_per_epoch * config_.batch_size, train_.num_samples());
  auto images_before_step = [&](int64_t step_in_epoch) {
    return std::min(step_in_epoch * accum * config_.batch_size, images_per_epoch);
  };
  if (config_.max_steps <= 0 && config_.epochs > std::numeric_limits<int64_t>::max() / steps_per_epoch)
    throw InputError("epochs " + std::to_string(config_.epochs) + " x " + std::to_string(steps_per_epoch) +
                     " steps per epoch is more steps than can be counted; lower epochs");
  const int64_t total_steps = config_.max_steps > 0 ? config_.max_steps : config_.epochs * steps_per_epoch;
  const int64_t total_epochs = total_steps / steps_per_epoch + (total_steps % steps_per_epoch != 0);
  const auto warmup = static_cast<int64_t>(std::llround(config_.schedule.warmup_fraction * static_cast<double>(total_steps)));

  Progress p;
  if (resume) {
    p = load_checkpoint();
    spdlog::info("resuming at step {} of {} (epoch {})", p.step, total_steps, p.epoch + 1);
  } else {
    write_file_atomic(dir_ / kConfig, config_.json.dump(2) + "\n");
    write_file_atomic(dir_ / kMetrics, "");
  }

  use_prefix_cache_ = decide_prefix_cache();
  if (use_prefix_cache_)
    spdlog::info("caching the frozen prefix ({} block{} before the first adapter{}) per image: later epochs skip it",
                 model_.frozen_prefix_blocks(), model_.frozen_prefix_blocks() == 1 ? "" : "s",
                 model_.method() == Method::kLinearProbe ? ", and the head: the whole backbone" : "");
  TrainSummary summary;
  summary.method = method_name(config_.method);
  summary.trainable_params = model_.trainable_count();
  summary.total_params = model_.total_count();
  summary.precision = precision_name(precision_);
  reset_peak_memory(device_);
  double train_seconds = 0;
  int64_t train_images = 0;

  // By epoch, not by step: a run stopped after the last step of an epoch resumes with that epoch's validation and
  // adapter saves.
  while (p.epoch < total_epochs) {
    const int64_t steps_this_epoch = std::min(steps_per_epoch, total_steps - p.epoch * steps_per_epoch);
    if (p.step_in_epoch < steps_this_epoch) {  // else stopped after its last step: only the epoch's end remains
      if (use_prefix_cache_ && static_cast<int64_t>(train_cache_.rows.size()) >= train_.num_usable())
        train_.set_images_needed(false);
      train_.start_epoch(p.epoch, p.step_in_epoch * accum);
      model_.set_training(true);
      ProgressBar bar("epoch " + std::to_string(p.epoch + 1) + "/" + std::to_string(total_epochs),
                      images_before_step(steps_this_epoch), "img");
      bar.restart_rate(images_before_step(p.step_in_epoch));
      double window_loss = 0;
      int64_t window_steps = 0;
      auto window_start = std::chrono::steady_clock::now();
      int64_t window_images = 0;

      while (p.step_in_epoch < steps_this_epoch) {
        const auto step_start = std::chrono::steady_clock::now();
        double step_loss = 0;
        const int64_t micro_batches = std::min(accum, batches_per_epoch - p.step_in_epoch * accum);
        const int64_t step_images = images_before_step(p.step_in_epoch + 1) - images_before_step(p.step_in_epoch);
        for (int64_t k = 0; k < micro_batches; ++k) {
          auto batch = train_.next();
          if (!batch) throw RuntimeFailure("the training data ended before the epoch did");
          if (batch->indices.empty()) continue;  // every image of it failed to decode (skipped and listed)
          const at::Tensor y = batch->labels.to(device_, /*non_blocking=*/true);
          const at::Tensor logits = forward_logits(*batch, use_prefix_cache_ ? &train_cache_ : nullptr);
          // Each micro-batch weighs by its images: a mean over the step's images (exactly loss / accum when full).
          const double share = static_cast<double>(step_images) / static_cast<double>(batch->indices.size());
          step_loss += backward_micro_batch(logits, y, share, *scaler_, config_.label_smoothing);
          window_images += static_cast<int64_t>(batch->indices.size());
        }
        const double lr = scheduled_lr(p.step, total_steps, warmup, config_.optim.lr, config_.schedule.min_lr_ratio);
        const StepOutcome outcome =
            apply_step(trainable_, *optimizer_, *scaler_, lr, config_.optim.grad_clip, std::isfinite(step_loss));
        const bool finite = outcome.applied;
        const double grad_norm = outcome.grad_norm;
        p.nonfinite_streak = finite ? 0 : p.nonfinite_streak + 1;
        ++p.step;
        ++p.step_in_epoch;
        train_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - step_start).count();
        train_images += step_images;
        window_loss += finite ? step_loss : 0;
        window_steps += finite;
        summary.final_train_loss = finite ? step_loss : summary.final_train_loss;

        if (precision_ == Precision::kFp16 && p.nonfinite_streak >= kMaxNonFiniteStepsFp16)
          throw RuntimeFailure("fp16 overflow: " + std::to_string(p.nonfinite_streak) + " steps in a row had inf/NaN "
                               "gradients (loss scale now " + std::to_string(scaler_->scale()) + "); use precision bf16 "
                               "or fp32, or lower optim.lr");
        if (precision_ != Precision::kFp16 && p.nonfinite_streak >= kMaxNonFiniteSteps)
          throw RuntimeFailure("the loss was NaN/inf for " + std::to_string(p.nonfinite_streak) + " steps in a row (at step " +
                               std::to_string(p.step) + "): the learning rate " + std::to_string(config_.optim.lr) +
                               " is probably too high; lower optim.lr or lengthen schedule.warmup_fraction");

        if (p.step % config_.log_every_steps == 0 || p.step_in_epoch == steps_this_epoch) {
          const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - window_start).count();
          json line = {{"type", "train"},
                       {"step", p.step},
                       {"epoch", p.epoch + 1},
                       {"loss", window_steps ? window_loss / window_steps : std::nan("")},
                       {"lr", lr},
                       {"grad_norm", grad_norm},
                       {"images_per_second", dt > 0 ? window_images / dt : 0.0},
                       {"memory_bytes", peak_memory(device_)}};
          if (scaler_->enabled()) line["loss_scale"] = scaler_->scale();
          append_metrics(line, p);
          window_loss = 0, window_steps = 0, window_images = 0;
          window_start = std::chrono::steady_clock::now();
        }
        char status[96];
        std::snprintf(status, sizeof status, "step %lld loss %.4f lr %.2e ", static_cast<long long>(p.step), step_loss, lr);
        bar.update(images_before_step(p.step_in_epoch), status + memory_status(device_));

        const bool stop = g_stop_requested || (hooks_.stop_after_step && hooks_.stop_after_step(p.step));
        if (stop || (config_.checkpoint_every_steps > 0 && p.step % config_.checkpoint_every_steps == 0)) save_checkpoint(p);
        if (stop) {
          bar.finish();
          throw Interrupted("stopped after step " + std::to_string(p.step) + " of " + std::to_string(total_steps) +
                            "; checkpoint saved in " + (dir_ / kCheckpoint).string());
        }
      }
      bar.finish();
    }

    ++p.epoch;
    p.step_in_epoch = 0;
    if (val_ && (p.epoch % config_.eval_every_epochs == 0 || p.step >= total_steps)) {
      const Validation v = validate();
      const bool best = v.top1 > p.best_top1;
      if (best) {
        p.best_top1 = v.top1;
        p.best_epoch = p.epoch;
        save_adapter_to(kBestAdapter);
      }
      summary.final_val_top1 = v.top1;
      summary.final_val_loss = v.loss;
      append_metrics({{"type", "val"}, {"step", p.step}, {"epoch", p.epoch}, {"val_loss", v.loss}, {"val_top1", v.top1}}, p);
      spdlog::info("epoch {}/{}: val loss {:.4f}, top-1 {}{}", p.epoch, total_epochs, v.loss, format_percent(v.top1),
                   best ? " (best so far)" : "");
    }
    save_adapter_to(kLastAdapter);
    save_checkpoint(p);
  }

  summary.steps = p.step;
  summary.epochs = p.epoch;
  summary.images_seen = p.step / steps_per_epoch * images_per_epoch + images_before_step(p.step % steps_per_epoch);
  summary.best_val_top1 = p.best_top1;
  summary.best_epoch = p.best_epoch;
  summary.peak_memory = peak_memory(device_);
  summary.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  summary.train_images_per_second = train_seconds > 0 ? train_images / train_seconds : 0.0;
  summary.skipped_files = train_.skipped();
  if (val_)
    for (const auto& s : val_->skipped()) summary.skipped_files.push_back(s);
  write_file_atomic(dir_ / kSummary, summary.to_json().dump(2) + "\n");
  return summary;
}

}  // namespace loratune
