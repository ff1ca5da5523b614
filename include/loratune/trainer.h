// The training loop: micro-batches with gradient accumulation, mixed precision with loss scaling, gradient
// checkpointing, AdamW with warm-up + cosine, validation, best/last adapters, checkpoints that resume exactly.
// loss contrastive (FLYP): each image is paired with one prompt of its class (drawn per image and step from the
// class's names x templates, reproducibly); CLIP's symmetric loss over each micro-batch, its other pairs the
// negatives (a micro-batch is its own set: accumulation and data-parallel shares add losses, not negatives).
// Validation and saved adapters score classes by the adapted text tower's class embeddings.
#pragma once

#include <atomic>
#include <chrono>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include <nlohmann/json.hpp>

#include "loratune/amp.h"
#include "loratune/config.h"
#include "loratune/batch_source.h"
#include "loratune/model.h"
#include "loratune/process_group.h"
#include "loratune/threads.h"
#include "loratune/training_setup.h"

namespace loratune {

class AdamW;
class LossScaler;

struct TrainSummary {
  std::string method;
  int64_t steps = 0, epochs = 0, images_seen = 0;
  int64_t trainable_params = 0, total_params = 0;
  double best_val_top1 = -1, final_val_top1 = -1, final_val_loss = -1;
  int64_t best_epoch = -1;
  bool stopped_early = false;  // early_stopping.patience ended the run before its last epoch
  double final_train_loss = 0;
  int64_t peak_memory = 0;  // bytes: CUDA peak allocated, or peak RSS on CPU
  double seconds = 0, train_images_per_second = 0;
  std::string precision;
  std::vector<int> threads;  // intra-op thread counts in the order `threads: auto` chose them (one when pinned)
  std::vector<std::pair<std::string, std::string>> skipped_files;

  nlohmann::json to_json() const;
};

// What the training loop reports as it goes. The defaults do nothing; console_reporter() draws the progress bars and
// log lines of `loratune train`. A C++ program passes its own to drive a UI, or nothing for silence.
class TrainingReporter {
 public:
  struct Step {
    int64_t step, epoch, epochs;
    int64_t images_done, images_total;  // in this epoch
    double loss, lr;
  };
  struct Validation {
    int64_t epoch, epochs;
    double loss, top1;
    bool best;  // better than every earlier validation: saved as best/
  };
  virtual ~TrainingReporter() = default;
  virtual void message(const std::string& text) {}  // one informative line (resuming, caching, ...)
  virtual void warning(const std::string& text) {}  // one line the user should act on (skipped files, fallbacks)
  // An epoch's training part begins (`images_done` > 0 when resumed inside it) / ends (also when interrupted).
  virtual void epoch_begin(int64_t epoch, int64_t epochs, int64_t images_total, int64_t images_done) {}
  virtual void step_end(const Step& step) {}
  virtual void epoch_end() {}
  virtual void validation_progress(int64_t images_done, int64_t images_total) {}
  virtual void validation_end(const Validation& result) {}
  // Each line the run appends to metrics.jsonl (train windows and validations), for sinks of a program's own.
  virtual void metrics_line(const nlohmann::json& line) {}
};

// Progress bars with rate and ETA on stderr, and log lines (spdlog), for `device`'s memory readings.
std::shared_ptr<TrainingReporter> console_reporter(const c10::Device& device);

struct TrainerHooks {
  // Called after each optimiser step; returning true stops the run as Ctrl-C would (checkpoint, Interrupted).
  std::function<bool(int64_t step)> stop_after_step;
  // Where progress goes; empty: console_reporter.
  std::shared_ptr<TrainingReporter> reporter;
  // Data-parallel workers (one Trainer per process, each reading its share of every batch): gradients are summed
  // once per optimiser step, validation metrics over all shares, and only rank 0 writes files.
  ProcessGroup* data_parallel = nullptr;
  // loss contrastive (loratune_text, zero_shot.h): the class prompts (class_prompt_maker()) and the head from the
  // adapted text tower for validation and saved adapters (zero_shot_head_initializer()).
  ClassPromptMaker class_prompts;
  ZeroShotHeadInit text_head;
};

// Refuses to start over a run (its checkpoint exists) or to resume nothing: InputError saying what to do.
void check_run_folder(const std::filesystem::path& output_dir, bool resume);

// One writer per run folder: an advisory lock on output_dir/.lock (made with the folder if missing), held while the
// object lives and released by the system when the process ends in any way. Taking it again in the same process
// nests. InputError naming the process that holds it.
class RunFolderLock {
 public:
  explicit RunFolderLock(const std::filesystem::path& output_dir);
  ~RunFolderLock();
  RunFolderLock(const RunFolderLock&) = delete;
  RunFolderLock& operator=(const RunFolderLock&) = delete;

 private:
  std::filesystem::path key_;
};

class Trainer {
 public:
  Trainer(const TrainConfig& config, Model& model, BatchSource& train, BatchSource* val, std::vector<std::string> classes,
          const c10::Device& device, Precision precision, TrainerHooks hooks = {});
  ~Trainer();

  // Trains (or continues the checkpoint in output_dir with `resume`). Throws Interrupted after saving a
  // checkpoint when a stop was requested.
  TrainSummary run(bool resume);

  // Asks the loop to stop after the current optimiser step (safe from a signal handler).
  static void request_stop();

  // Files the run writes, relative to output_dir.
  static constexpr const char* kLastAdapter = "adapter";
  static constexpr const char* kBestAdapter = "best";
  static constexpr const char* kCheckpoint = "checkpoint.safetensors";
  static constexpr const char* kMetrics = "metrics.jsonl";
  static constexpr const char* kSummary = "summary.json";
  static constexpr const char* kConfig = "config.json";

 private:
  struct Progress {
    int64_t step = 0, epoch = 0, step_in_epoch = 0, metrics_lines = 0, nonfinite_streak = 0;
    double best_top1 = -1;
    int64_t best_epoch = -1;
    bool stopped_early = false;
  };
  struct Validation {
    double loss = 0, top1 = 0;
  };

  // Outputs of the model's frozen prefix by sample index, reused across epochs (no augmentation only).
  struct PrefixCache {
    std::unordered_map<int64_t, at::Tensor> rows;
  };

  // The run's arithmetic: steps per epoch (the last may have fewer micro-batches), total steps and epochs, warm-up.
  struct Schedule {
    int64_t accum = 1, batch_size = 1, batches_per_epoch = 0, steps_per_epoch = 0, images_per_epoch = 0;
    int64_t total_steps = 0, total_epochs = 0, warmup = 0;
    int64_t images_before_step(int64_t step_in_epoch) const;
    int64_t steps_in_epoch(int64_t epoch) const;
  };
  // Optimiser steps between two metrics.jsonl lines: mean loss of the finite steps, images per second.
  struct MetricWindow {
    double loss = 0;
    int64_t steps = 0, images = 0;
    std::chrono::steady_clock::time_point start = std::chrono::steady_clock::now();
    void add(bool finite, double step_loss, int64_t step_images);
    nlohmann::json line(int64_t step, int64_t epoch, double lr, double grad_norm, int64_t memory,
                        const LossScaler& scaler, int threads) const;
  };
  struct Throughput {
    double seconds = 0;  // inside training steps
    int64_t images = 0;
  };
  struct StepResult {
    double loss = 0;
    int64_t images_done = 0;
  };

  Schedule plan_schedule() const;
  // The optimiser steps of one epoch from p.step_in_epoch on, with metric lines, checkpoints and stop requests.
  void train_epoch(const Schedule& schedule, Progress& p, TrainSummary& summary, Throughput& throughput);
  // Forward and backward over one optimiser step's micro-batches: the step's loss and the images it used.
  StepResult forward_backward(int64_t micro_batches, int64_t step_images, int64_t step);
  // loss contrastive: the symmetric CLIP loss of one micro-batch and its prompts, unscaled.
  at::Tensor contrastive_loss_of(const Batch& batch, int64_t step);
  // loss contrastive: the head from the text tower as adapted now, if training changed it since the last time.
  void refresh_text_head();
  // RuntimeFailure when too many steps in a row were skipped for inf/NaN gradients.
  void stop_on_nonfinite_streak(const Progress& p) const;
  // Validation at an epoch's end: the best adapter, the metrics line, early stopping.
  void validate_epoch(const Schedule& schedule, Progress& p, TrainSummary& summary);
  Validation validate();
  // Data-parallel: sums the step's gradients and its loss, image count and stop request over the workers.
  void reduce_step(double& step_loss, int64_t& step_images_done, bool& stop);
  bool writes_files() const { return !hooks_.data_parallel || hooks_.data_parallel->rank() == 0; }
  bool decide_prefix_cache() const;
  at::Tensor prefix_for(PrefixCache& cache, const Batch& batch);
  at::Tensor forward_logits(const Batch& batch, PrefixCache* cache);
  at::Tensor forward_features(const Batch& batch, PrefixCache* cache);
  at::Tensor forward_images(const Batch& batch, PrefixCache* cache, bool logits);
  void save_checkpoint(const Progress& p);
  // The checkpoint's state, every value checked against `schedule`: InputError naming the file and the value.
  Progress load_checkpoint(const Schedule& schedule);
  void save_adapter_to(const std::string& name);
  void append_metrics(const nlohmann::json& line, Progress& p);
  nlohmann::json adapter_training_record() const;
  std::string base_fingerprint() const;  // the base model's (and text tower's) fingerprint
  // Refuses to resume a checkpoint written for other settings or another base (InputError listing what differs).
  void check_resumable(const std::map<std::string, std::string>& metadata, const std::filesystem::path& path) const;

  const TrainConfig& config_;
  Model& model_;
  BatchSource& train_;
  BatchSource* val_;
  std::vector<std::string> classes_;
  c10::Device device_;
  Precision precision_;
  TrainerHooks hooks_;
  std::filesystem::path dir_;
  std::unique_ptr<AdamW> optimizer_;
  std::unique_ptr<LossScaler> scaler_;
  std::vector<NamedTensor> trainable_;
  at::Tensor initial_head_weight_, initial_head_bias_;  // head.init zero_shot: where the head started (WiSE-FT merges)
  bool use_prefix_cache_ = false;
  bool contrastive_ = false;
  ClassPrompts prompts_;          // loss contrastive
  bool text_head_stale_ = false;  // the text adapters changed since the head was made from them
  PrefixCache train_cache_, val_cache_;
  std::shared_ptr<TrainingReporter> reporter_;
  ThreadTuner threads_;
};

}  // namespace loratune
