// The training loop: micro-batches with gradient accumulation, mixed precision with loss scaling, gradient
// checkpointing, AdamW with warm-up + cosine, validation, best/last adapters, checkpoints that resume exactly.
// loss contrastive (FLYP): each image is paired with one prompt of its class (drawn per image and step from the
// class's names x templates, reproducibly) or, with captions, one of its captions (drawn per image and epoch);
// CLIP's symmetric loss, the other pairs of the optimiser step the negatives (contrastive.negatives step: embeddings
// cached over the micro-batches, backward_contrastive_cached in train_step.h) or of the micro-batch only; pairs of
// one class (class prompts) or one caption text are not each other's negatives. Data-parallel workers gather the
// step's embeddings (step) or keep their share of each micro-batch (micro_batch). Validation and saved adapters score
// classes by the adapted text tower's class embeddings.
#pragma once

#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <string>
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
  // Called after each optimiser step; returning true stops the run (checkpoint, Interrupted). A program that stops
  // on a signal sets its own flag in the handler and returns it here (`loratune train` does for Ctrl-C).
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
  // loss contrastive on captions (data.captions): each training sample's captions, by its index in the training
  // source, and the text tower's tokenizer (text_tokenizer_for()). Empty: class prompts.
  std::vector<std::vector<std::string>> captions;
  TextTokenizerFor tokenize;
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
  // checkpoint when hooks.stop_after_step asked to stop.
  TrainSummary run(bool resume);

  // Files the run writes, relative to output_dir.
  static constexpr const char* kLastAdapter = "adapter";
  static constexpr const char* kBestAdapter = "best";
  static constexpr const char* kCheckpoint = "checkpoint.safetensors";
  static constexpr const char* kMetrics = "metrics.jsonl";
  static constexpr const char* kSummary = "summary.json";
  static constexpr const char* kConfig = "config.json";

 private:
  class Impl;  // the loop's state and steps (src/train/trainer_impl.h)
  std::unique_ptr<Impl> impl_;
};

}  // namespace loratune
