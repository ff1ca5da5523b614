#include "train/trainer_impl.h"

#include <ATen/core/grad_mode.h>
#include <spdlog/fmt/fmt.h>

#include <chrono>
#include <cmath>
#include <limits>

#include "loratune/errors.h"
#include "common/files.h"
#include "loratune/memory.h"
#include "loratune/metrics.h"
#include "loratune/optim.h"
#include "common/strings.h"
#include "loratune/train_step.h"
#include "loratune/training_setup.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace loratune {
namespace {


constexpr int64_t kMaxNonFiniteSteps = 3;       // fp32/bf16: NaN/inf this many steps in a row stops the run
constexpr int64_t kMaxNonFiniteStepsFp16 = 25;  // fp16: the scaler may need a few halvings first

uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// A well-spread draw from three counters.
uint64_t mix_bits(uint64_t a, uint64_t b, uint64_t c) { return splitmix64(splitmix64(splitmix64(a) ^ b) ^ c); }


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
          {"stopped_early", stopped_early},
          {"final_val_top1", final_val_top1},
          {"final_val_loss", final_val_loss},
          {"final_train_loss", final_train_loss},
          {"peak_memory_bytes", peak_memory},
          {"seconds", seconds},
          {"train_images_per_second", train_images_per_second},
          {"precision", precision},
          {"threads", threads},
          {"skipped_files", skipped}};
}


void check_run_folder(const fs::path& output_dir, bool resume) {
  const bool have_checkpoint = fs::exists(output_dir / Trainer::kCheckpoint);
  if (resume && !have_checkpoint)
    throw InputError("nothing to resume: " + (output_dir / Trainer::kCheckpoint).string() +
                     " does not exist; run without --resume");
  if (!resume && have_checkpoint)
    throw InputError(output_dir.string() + " already holds a run; continue it with --resume, or set output_dir to a "
                     "new folder");
}

Trainer::Trainer(const TrainConfig& config, Model& model, BatchSource& train, BatchSource* val,
                 std::vector<std::string> classes, const c10::Device& device, Precision precision, TrainerHooks hooks)
    : impl_(std::make_unique<Impl>(config, model, train, val, std::move(classes), device, precision, std::move(hooks))) {}

Trainer::~Trainer() = default;

TrainSummary Trainer::run(bool resume) { return impl_->run(resume); }

Trainer::Impl::Impl(const TrainConfig& config, Model& model, BatchSource& train, BatchSource* val,
                    std::vector<std::string> classes, const c10::Device& device, Precision precision, TrainerHooks hooks)
    : config_(config), model_(model), train_(train), val_(val), classes_(std::move(classes)), device_(device),
      precision_(precision), hooks_(std::move(hooks)), dir_(config.output_dir), trainable_(model.trainable()),
      reporter_(hooks_.reporter ? hooks_.reporter : console_reporter(device)), threads_(config.threads) {
  check_train_config(config);  // a config filled in code gets the checks a file gets
  optimizer_ = make_optimizer(config, model);
  scaler_ = make_loss_scaler(config, precision);
  if (config.head.init == HeadInit::kZeroShot && model.head().defined()) {  // as built, also on resume: before the checkpoint loads
    initial_head_weight_ = model.head().weight().detach().to(at::kCPU).clone();
    initial_head_bias_ = model.head().bias().detach().to(at::kCPU).clone();
  }
  contrastive_ = config.loss == TrainingLoss::kContrastive;
  if (contrastive_) {
    if (!model.has_text_tower() || !hooks_.class_prompts || !hooks_.text_head)
      throw InputError("loss contrastive needs the model's text tower (build_training_model) and the CLIP text side: "
                       "link loratune_text and pass class_prompt_maker() and zero_shot_head_initializer()");
    prompts_ = hooks_.class_prompts(model, classes_, config.head);
    text_head_stale_ = true;  // on resume the adapters the head must follow are loaded later
    if (!hooks_.captions.empty()) tokenize_captions();
  }
}

void Trainer::Impl::tokenize_captions() {
  if (!hooks_.tokenize) throw InputError("captions need the text tower's tokenizer: pass text_tokenizer_for()");
  if (static_cast<int64_t>(hooks_.captions.size()) != train_.num_samples())
    throw RuntimeFailure("internal: " + std::to_string(hooks_.captions.size()) + " caption lists for " +
                         std::to_string(train_.num_samples()) + " training samples");
  std::vector<std::string> texts;
  std::map<std::string, int64_t> text_ids;
  for (const auto& captions : hooks_.captions) {
    std::vector<int64_t> groups;
    for (const auto& caption : captions) {
      groups.push_back(text_ids.emplace(caption, static_cast<int64_t>(text_ids.size())).first->second);
      texts.push_back(caption);
    }
    caption_groups_.push_back(std::move(groups));
  }
  const TokenizedTexts tokenized = hooks_.tokenize(model_, texts);
  int64_t row = 0;
  for (const auto& groups : caption_groups_) {
    caption_tokens_.push_back(tokenized.tokens.narrow(0, row, static_cast<int64_t>(groups.size())));
    row += static_cast<int64_t>(groups.size());
  }
  reporter_->message(fmt::format("{} captions ({} different) for {} training photos", texts.size(), text_ids.size(),
                                 caption_groups_.size()));
  if (tokenized.truncated > 0)
    reporter_->warning(fmt::format("{} of {} captions are longer than the text tower's {} tokens and were cut (CLIP's "
                                   "tokenizer is made for English: other scripts take more tokens per word)",
                                   tokenized.truncated, texts.size(), tokenized.tokens.size(1)));
}

void Trainer::Impl::refresh_text_head() {
  if (!contrastive_ || !text_head_stale_) return;
  model_.set_training(false);
  at::NoGradGuard no_grad;
  AutocastScope autocast(device_, precision_);
  hooks_.text_head(model_, classes_, config_.head);
  text_head_stale_ = false;
}

Trainer::Impl::Validation Trainer::Impl::validate() {
  refresh_text_head();
  model_.set_training(false);
  at::NoGradGuard no_grad;
  PrefixCache* cache = use_prefix_cache_ ? &val_cache_ : nullptr;
  if (cache && static_cast<int64_t>(cache->rows.size()) >= val_->num_usable()) val_->set_images_needed(false);
  std::vector<at::Tensor> logits, labels;
  int64_t done = 0;
  val_->start_epoch(0, 0);
  while (auto batch = val_->next()) {
    logits.push_back(forward_logits(*batch, cache).to(at::kCPU, at::kFloat));
    labels.push_back(batch->labels);
    done += static_cast<int64_t>(batch->indices.size());
    // A data-parallel worker reads its share of each batch: its progress stands for everyone's.
    const int64_t workers = hooks_.data_parallel ? hooks_.data_parallel->size() : 1;
    reporter_->validation_progress(std::min(done * workers, val_->num_samples()), val_->num_samples());
  }
  if (!hooks_.data_parallel) {
    const ClassificationMetrics m = compute_metrics(at::cat(logits), at::cat(labels));
    return {m.loss, m.top1};
  }
  // Each worker saw its share: sum the losses, the correct answers and the counts.
  double loss_sum = 0, correct = 0, count = 0;
  if (!logits.empty()) {
    const ClassificationMetrics m = compute_metrics(at::cat(logits), at::cat(labels));
    count = static_cast<double>(at::cat(labels).numel());
    loss_sum = m.loss * count;
    correct = m.top1 * count;
  }
  const auto totals = hooks_.data_parallel->sum(std::vector<double>{loss_sum, correct, count});
  return {totals[0] / totals[2], totals[1] / totals[2]};
}

void Trainer::Impl::reduce_step(double& step_loss, int64_t& step_images_done, bool& stop) {
  // The optimiser's flat buffers: one collective per group (a share without images adds zeros).
  std::vector<at::Tensor> grads = optimizer_->gradients();
  hooks_.data_parallel->sum(grads);
  const auto totals = hooks_.data_parallel->sum(
      std::vector<double>{std::isfinite(step_loss) ? step_loss : 0.0, std::isfinite(step_loss) ? 0.0 : 1.0,
                          static_cast<double>(step_images_done), stop ? 1.0 : 0.0});
  step_loss = totals[1] > 0 ? std::nan("") : totals[0];
  step_images_done = static_cast<int64_t>(totals[2]);
  stop = totals[3] > 0;
}

Trainer::Impl::Schedule Trainer::Impl::plan_schedule() const {
  Schedule s;
  s.accum = config_.grad_accum_steps;
  s.batch_size = config_.batch_size;
  s.batches_per_epoch = train_.batches_per_epoch();
  if (s.batches_per_epoch == 0) throw InputError("no training images");
  // The last step of an epoch may have fewer micro-batches, and its last micro-batch fewer images.
  s.steps_per_epoch = (s.batches_per_epoch + s.accum - 1) / s.accum;
  s.images_per_epoch = std::min(s.batches_per_epoch * config_.batch_size, train_.num_samples());
  if (config_.max_steps <= 0 && config_.epochs > std::numeric_limits<int64_t>::max() / s.steps_per_epoch)
    throw InputError("epochs " + std::to_string(config_.epochs) + " x " + std::to_string(s.steps_per_epoch) +
                     " steps per epoch is more steps than can be counted; lower epochs");
  s.total_steps = config_.max_steps > 0 ? config_.max_steps : config_.epochs * s.steps_per_epoch;
  s.total_epochs = s.total_steps / s.steps_per_epoch + (s.total_steps % s.steps_per_epoch != 0);
  s.warmup = static_cast<int64_t>(std::llround(config_.schedule.warmup_fraction * static_cast<double>(s.total_steps)));
  return s;
}

int64_t Trainer::Impl::Schedule::images_before_step(int64_t step_in_epoch) const {
  return std::min(step_in_epoch * accum * batch_size, images_per_epoch);
}

int64_t Trainer::Impl::Schedule::steps_in_epoch(int64_t epoch) const {
  return std::min(steps_per_epoch, total_steps - epoch * steps_per_epoch);
}

TrainSummary Trainer::Impl::run(bool resume) {
  const auto start = std::chrono::steady_clock::now();
  if (writes_files()) {
    fs::create_directories(dir_);
    remove_stale_temporaries(dir_);
  }
  check_run_folder(dir_, resume);
  const Schedule schedule = plan_schedule();

  Progress p;
  if (resume) {
    p = load_checkpoint(schedule);
    if ((p.epoch >= schedule.total_epochs || p.stopped_early) && fs::exists(dir_ / kSummary))
      throw InputError(fmt::format("the run in {} has finished (step {} of {}{}): nothing to resume; its adapters are "
                                   "in {} and {}", dir_.string(), p.step, schedule.total_steps,
                                   p.stopped_early ? ", stopped early" : "", (dir_ / kLastAdapter).string(),
                                   (dir_ / kBestAdapter).string()));
    reporter_->message(fmt::format("resuming at step {} of {} (epoch {})", p.step, schedule.total_steps, p.epoch + 1));
  } else if (writes_files()) {
    write_file_atomic(dir_ / kConfig, config_json(config_).dump(2) + "\n");
    write_file_atomic(dir_ / kMetrics, "");
  }

  use_prefix_cache_ = !hooks_.data_parallel && decide_prefix_cache();
  if (use_prefix_cache_)
    reporter_->message(fmt::format(
        "caching the frozen prefix ({} block{} before the first adapter{}) per image: later epochs skip it",
        model_.blocks().frozen_prefix(), model_.blocks().frozen_prefix() == 1 ? "" : "s",
        model_.method() == Method::kLinearProbe ? ", and the head: the whole backbone" : ""));
  TrainSummary summary;
  summary.method = method_name(config_.method);
  summary.trainable_params = model_.trainable_count();
  summary.total_params = model_.total_count();
  summary.precision = precision_name(precision_);
  reset_peak_memory(device_);
  Throughput throughput;

  // By epoch, not by step: a run stopped after the last step of an epoch resumes with that epoch's validation and
  // adapter saves.
  while (p.epoch < schedule.total_epochs && !p.stopped_early) {
    // Else stopped after its last step: only the epoch's end remains.
    if (p.step_in_epoch < schedule.steps_in_epoch(p.epoch)) train_epoch(schedule, p, summary, throughput);
    ++p.epoch;
    p.step_in_epoch = 0;
    if (val_ && (p.epoch % config_.eval_every_epochs == 0 || p.step >= schedule.total_steps))
      validate_epoch(schedule, p, summary);
    save_adapter_to(kLastAdapter);
    save_checkpoint(p);
  }

  summary.steps = p.step;
  summary.epochs = p.epoch;
  summary.stopped_early = p.stopped_early;
  summary.images_seen = p.step / schedule.steps_per_epoch * schedule.images_per_epoch +
                        schedule.images_before_step(p.step % schedule.steps_per_epoch);
  summary.best_val_top1 = p.best_top1;
  summary.best_epoch = p.best_epoch;
  summary.peak_memory = peak_memory(device_);
  summary.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  summary.train_images_per_second = throughput.seconds > 0 ? throughput.images / throughput.seconds : 0.0;
  summary.threads = threads_.history();
  summary.skipped_files = train_.skipped();
  if (val_)
    for (const auto& s : val_->skipped()) summary.skipped_files.push_back(s);
  if (writes_files()) write_file_atomic(dir_ / kSummary, summary.to_json().dump(2) + "\n");
  return summary;
}

void Trainer::Impl::train_epoch(const Schedule& schedule, Progress& p, TrainSummary& summary, Throughput& throughput) {
  const int64_t steps_this_epoch = schedule.steps_in_epoch(p.epoch);
  if (use_prefix_cache_ && static_cast<int64_t>(train_cache_.rows.size()) >= train_.num_usable())
    train_.set_images_needed(false);
  train_.start_epoch(p.epoch, p.step_in_epoch * schedule.accum);
  model_.set_training(true);
  reporter_->epoch_begin(p.epoch, schedule.total_epochs, schedule.images_before_step(steps_this_epoch),
                         schedule.images_before_step(p.step_in_epoch));
  MetricWindow window;
  while (p.step_in_epoch < steps_this_epoch) {
    const auto step_start = std::chrono::steady_clock::now();
    const int64_t micro_batches = std::min(schedule.accum, schedule.batches_per_epoch - p.step_in_epoch * schedule.accum);
    const int64_t step_images =
        schedule.images_before_step(p.step_in_epoch + 1) - schedule.images_before_step(p.step_in_epoch);
    StepResult step = forward_backward(micro_batches, step_images, p.step, p.epoch);
    bool stop = hooks_.stop_after_step && hooks_.stop_after_step(p.step + 1);
    if (hooks_.data_parallel) reduce_step(step.loss, step.images_done, stop);  // every worker agrees to stop
    const double lr = scheduled_lr(p.step, schedule.total_steps, schedule.warmup, config_.optim.lr,
                                   config_.schedule.min_lr_ratio);
    const StepOutcome outcome =
        apply_step(*optimizer_, *scaler_, lr, config_.optim.grad_clip, std::isfinite(step.loss));
    p.nonfinite_streak = outcome.applied ? 0 : p.nonfinite_streak + 1;
    text_head_stale_ = contrastive_;
    ++p.step;
    ++p.step_in_epoch;
    const double step_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - step_start).count();
    throughput.seconds += step_seconds;
    throughput.images += step_images;
    threads_.record(step_seconds, step_images);
    window.add(outcome.applied, step.loss, step.images_done);
    if (outcome.applied) summary.final_train_loss = step.loss;
    stop_on_nonfinite_streak(p);

    if (p.step % config_.log_every_steps == 0 || p.step_in_epoch == steps_this_epoch) {
      append_metrics(
          window.line(p.step, p.epoch + 1, lr, outcome.grad_norm, peak_memory(device_), *scaler_, threads_.threads()), p);
      window = MetricWindow();
    }
    reporter_->step_end({p.step, p.epoch, schedule.total_epochs, schedule.images_before_step(p.step_in_epoch),
                         schedule.images_before_step(steps_this_epoch), step.loss, lr});

    if (stop || (config_.checkpoint_every_steps > 0 && p.step % config_.checkpoint_every_steps == 0)) save_checkpoint(p);
    if (stop) {
      reporter_->epoch_end();
      throw Interrupted("stopped after step " + std::to_string(p.step) + " of " + std::to_string(schedule.total_steps) +
                        "; checkpoint saved in " + (dir_ / kCheckpoint).string());
    }
  }
  reporter_->epoch_end();
}

Trainer::Impl::StepResult Trainer::Impl::forward_backward(int64_t micro_batches, int64_t step_images, int64_t step,
                                                          int64_t epoch) {
  StepResult result;
  // One micro-batch in one process is its own step: the plain loss, without the second pass.
  const bool step_negatives = contrastive_ && config_.contrastive.negatives == ContrastiveNegatives::kStep &&
                              (micro_batches > 1 || hooks_.data_parallel);
  std::vector<Batch> step_batches;  // step negatives: the micro-batches, embedded together after they are read
  for (int64_t k = 0; k < micro_batches; ++k) {
    auto batch = train_.next();
    if (!batch) throw RuntimeFailure("the training data ended before the epoch did");
    if (batch->indices.empty()) continue;  // every image of it failed to decode (skipped and listed)
    result.images_done += static_cast<int64_t>(batch->indices.size());
    if (step_negatives) {
      step_batches.push_back(std::move(*batch));
      continue;
    }
    // Each micro-batch weighs by its images: a mean over the step's images (exactly loss / accum when full).
    const double share = static_cast<double>(step_images) / static_cast<double>(batch->indices.size());
    if (contrastive_) {
      const PairedTexts texts = texts_for(*batch, step, epoch);
      const PairedFeatures f = embed_pairs(*batch, texts.tokens);
      result.loss += backward_loss(contrastive_loss(f.image, f.text, logit_scale(), texts.groups), share, *scaler_);
    } else {
      const at::Tensor y = batch->labels.to(device_, /*non_blocking=*/true);
      const at::Tensor logits = forward_logits(*batch, use_prefix_cache_ ? &train_cache_ : nullptr);
      result.loss += backward_micro_batch(logits, y, share, *scaler_, config_.label_smoothing);
    }
  }
  // Data parallel: every worker joins the step's gathering, with no photos of its own too.
  if (!step_batches.empty() || (step_negatives && hooks_.data_parallel))
    result.loss += backward_contrastive_step(step_batches, step_images, step, epoch);
  return result;
}

double Trainer::Impl::backward_contrastive_step(const std::vector<Batch>& batches, int64_t step_images, int64_t step,
                                                int64_t epoch) {
  std::vector<at::Tensor> tokens, groups;
  int64_t images = 0;
  for (const Batch& batch : batches) {
    PairedTexts texts = texts_for(batch, step, epoch);
    tokens.push_back(texts.tokens);
    groups.push_back(texts.groups);
    images += static_cast<int64_t>(batch.indices.size());
  }
  const auto embed = [&](int64_t k) {
    return embed_pairs(batches[static_cast<size_t>(k)], tokens[static_cast<size_t>(k)]);
  };
  const at::Tensor all_groups = groups.empty() ? at::empty({0}, at::kLong) : at::cat(groups);
  if (ProcessGroup* workers = hooks_.data_parallel) {
    // The loss over every worker's pairs; each worker's gradients are those of its rows, summed after the step. The
    // loss is counted once over the workers.
    const double loss = backward_contrastive_cached(static_cast<int64_t>(batches.size()), embed, logit_scale(),
                                                    all_groups, 1.0, *scaler_, device_, workers);
    return loss / workers->size();
  }
  const double weight = static_cast<double>(images) / static_cast<double>(step_images);
  return backward_contrastive_cached(static_cast<int64_t>(batches.size()), embed, logit_scale(), all_groups, weight,
                                     *scaler_, device_);
}

Trainer::Impl::PairedTexts Trainer::Impl::texts_for(const Batch& batch, int64_t step, int64_t epoch) const {
  // Class prompts: one per image, a function of the seed, the step and the image; captions: of the seed, the epoch
  // and the image. The same after a resume.
  std::vector<at::Tensor> rows;
  std::vector<int64_t> groups;
  for (size_t k = 0; k < batch.indices.size(); ++k) {
    const int64_t index = batch.indices[k];
    const bool captioned = !caption_tokens_.empty();
    const int64_t label = batch.labels[static_cast<int64_t>(k)].item<int64_t>();
    const at::Tensor& choices = captioned ? caption_tokens_.at(static_cast<size_t>(index))
                                          : prompts_.tokens.at(static_cast<size_t>(label));
    const uint64_t draw = mix_bits(config_.seed, static_cast<uint64_t>(captioned ? epoch : step),
                                   static_cast<uint64_t>(index)) % static_cast<uint64_t>(choices.size(0));
    rows.push_back(choices[static_cast<int64_t>(draw)]);
    groups.push_back(captioned ? caption_groups_[static_cast<size_t>(index)][draw] : label);
  }
  return {at::stack(rows).to(device_, /*non_blocking=*/true), at::tensor(groups, at::kLong)};
}

PairedFeatures Trainer::Impl::embed_pairs(const Batch& batch, const at::Tensor& tokens) {
  PairedFeatures f;
  f.image = forward_features(batch, use_prefix_cache_ ? &train_cache_ : nullptr);
  AutocastScope autocast(device_, precision_);
  f.text = model_.text_features(tokens, config_.gradient_checkpointing);
  return f;
}

double Trainer::Impl::logit_scale() const { return model_.text_bundle().info.extra.value("logit_scale", 100.0); }

void Trainer::Impl::stop_on_nonfinite_streak(const Progress& p) const {
  if (precision_ == Precision::kFp16 && p.nonfinite_streak >= kMaxNonFiniteStepsFp16)
    throw RuntimeFailure("fp16 overflow: " + std::to_string(p.nonfinite_streak) + " steps in a row had inf/NaN "
                         "gradients (loss scale now " + std::to_string(scaler_->scale()) + "); use precision bf16 "
                         "or fp32, or lower optim.lr");
  if (precision_ != Precision::kFp16 && p.nonfinite_streak >= kMaxNonFiniteSteps)
    throw RuntimeFailure("the loss was NaN/inf for " + std::to_string(p.nonfinite_streak) + " steps in a row (at step " +
                         std::to_string(p.step) + "): the learning rate " + std::to_string(config_.optim.lr) +
                         " is probably too high; lower optim.lr or lengthen schedule.warmup_fraction");
}

void Trainer::Impl::MetricWindow::add(bool finite, double step_loss, int64_t step_images) {
  loss += finite ? step_loss : 0;
  steps += finite;
  images += step_images;
}

json Trainer::Impl::MetricWindow::line(int64_t step, int64_t epoch, double lr, double grad_norm, int64_t memory,
                                 const LossScaler& scaler, int threads) const {
  const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  json line = {{"type", "train"},
               {"step", step},
               {"epoch", epoch},
               {"loss", steps ? loss / steps : std::nan("")},
               {"lr", lr},
               {"grad_norm", grad_norm},
               {"images_per_second", dt > 0 ? images / dt : 0.0},
               {"memory_bytes", memory},
               {"threads", threads}};
  if (scaler.enabled()) line["loss_scale"] = scaler.scale();
  return line;
}

void Trainer::Impl::validate_epoch(const Schedule& schedule, Progress& p, TrainSummary& summary) {
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
  reporter_->validation_end({p.epoch, schedule.total_epochs, v.loss, v.top1, best});
  const int64_t patience = config_.early_stopping.patience;
  if (patience > 0 && p.epoch - p.best_epoch >= patience && p.epoch < schedule.total_epochs) {
    p.stopped_early = true;
    reporter_->message(fmt::format("early stopping after epoch {}: no better validation top-1 for {} epochs; best/ "
                                   "holds the adapter of epoch {}", p.epoch, p.epoch - p.best_epoch, p.best_epoch));
  }
}

}  // namespace loratune
