// Trainer's state and steps, behind its public header (trainer.h): the loop (trainer.cpp), the run's files and
// checkpoints (run_state.cpp) and the frozen-prefix cache (prefix_cache.cpp).
#pragma once

#include <chrono>
#include <map>
#include <unordered_map>

#include "loratune/train_step.h"
#include "loratune/trainer.h"

namespace loratune {

class Trainer::Impl {
 public:
  Impl(const TrainConfig& config, Model& model, BatchSource& train, BatchSource* val, std::vector<std::string> classes,
       const c10::Device& device, Precision precision, TrainerHooks hooks);
  TrainSummary run(bool resume);

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
  StepResult forward_backward(int64_t micro_batches, int64_t step_images, int64_t step, int64_t epoch);
  // loss contrastive: the contrastive loss over the step's micro-batches at once (cached embeddings); returns the
  // step's loss share of this worker.
  double backward_contrastive_step(const std::vector<Batch>& batches, int64_t step_images, int64_t step, int64_t epoch);
  // loss contrastive: each image's text (a class prompt or a caption, drawn reproducibly) and its negative group.
  struct PairedTexts {
    at::Tensor tokens;  // [n, context] on the device
    at::Tensor groups;  // [n] int64: pairs of one group are not each other's negatives
  };
  PairedTexts texts_for(const Batch& batch, int64_t step, int64_t epoch) const;
  PairedFeatures embed_pairs(const Batch& batch, const at::Tensor& tokens);
  double logit_scale() const;
  // loss contrastive on captions: each training sample's captions as tokens, and their texts' group ids.
  void tokenize_captions();
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
  std::vector<at::Tensor> caption_tokens_;           // loss contrastive on captions: per sample [captions, context]
  std::vector<std::vector<int64_t>> caption_groups_;  // per sample: each caption's text id
  bool text_head_stale_ = false;  // the text adapters changed since the head was made from them
  PrefixCache train_cache_, val_cache_;
  std::shared_ptr<TrainingReporter> reporter_;
  ThreadTuner threads_;
};

}  // namespace loratune
