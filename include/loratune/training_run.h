// The training use case, one call from a configuration to a finished run, as `loratune train` does it: check the
// run folder, join the data-parallel group when torchrun's variables (or `loratune train --nproc`) say so, scan
// and split the photo folders, fit the run to a memory budget, build the model with its adapters and head, train.
// Everything the run has to say goes to the reporter; a caller formats the result.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "loratune/config.h"
#include "loratune/trainer.h"
#include "loratune/training_setup.h"

namespace loratune {

struct TrainingRunOptions {
  bool resume = false;          // continue the checkpoint in output_dir
  int64_t memory_budget = 0;    // bytes; > 0: first choose the settings that fit it (fit_memory)
  ZeroShotHeadInit zero_shot;   // for head.init zero_shot: loratune::zero_shot_head_initializer() (zero_shot.h)
  ClassPromptMaker class_prompts;  // for loss contrastive: loratune::class_prompt_maker() (zero_shot.h)
  TextTokenizerFor tokenize;       // for data.captions: loratune::text_tokenizer_for() (zero_shot.h)
  std::shared_ptr<TrainingReporter> reporter;  // empty: console_reporter
  // Called after each optimiser step; true stops the run (checkpoint, Interrupted): TrainerHooks::stop_after_step.
  std::function<bool(int64_t step)> stop_after_step;
};

struct TrainingRun {
  TrainConfig config;                      // as trained: with the settings the memory fit chose
  std::vector<std::string> fit_overrides;  // those settings as "key=value"; empty without a budget
  TrainSummary summary;
  bool lead = true;  // false on data-parallel workers other than rank 0, which write and report nothing
};

// Claims output_dir for one run: refuses a folder that is one of the run's inputs or inside one, takes the folder's
// lock (RunFolderLock) and checks that there is a run to resume, or none to write over. InputError saying what to do.
std::unique_ptr<RunFolderLock> claim_run_folder(const TrainConfig& config, bool resume);

// Throws InputError for bad input (folders, config, a run folder in the way), RuntimeFailure when training fails,
// Interrupted after saving a checkpoint when asked to stop.
TrainingRun run_training(const TrainConfig& config, const TrainingRunOptions& options = {});

}  // namespace loratune
