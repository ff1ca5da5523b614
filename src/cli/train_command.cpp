#include <atomic>
#include <csignal>

#include <spdlog/spdlog.h>

#include "cli/commands.h"
#include "cli/common.h"
#include "common/strings.h"
#include "loratune/errors.h"
#include "loratune/image_folder.h"
#include "loratune/memory_plan.h"
#include "loratune/process_group.h"
#include "loratune/training_run.h"
#include "loratune/zero_shot.h"

namespace fs = std::filesystem;

namespace loratune {
namespace {

// Ctrl-C: the run stops after the current optimiser step (checkpoint, then a resume command).
std::atomic<bool> g_interrupted{false};

void on_interrupt(int) {
  g_interrupted = true;
  std::signal(SIGINT, SIG_DFL);  // a second Ctrl-C stops at once
}

// The command that continues an interrupted run.
std::string resume_command(const TrainCommand& command, bool data_parallel) {
  std::string again = "loratune train";
  if (!command.config.empty()) again += " --config " + command.config;
  for (const auto& o : command.overrides) again += " --set " + o;
  if (const char* nproc = std::getenv("LORATUNE_NPROC")) again += std::string(" --nproc ") + nproc;
  else if (data_parallel) again = "the same torchrun command with " + again;
  return again + " --resume";
}

void print_result(const TrainingRun& run) {
  const TrainSummary& s = run.summary;
  log_skipped(s.skipped_files, "data");
  const fs::path dir = run.config.output_dir;
  std::printf("\ntraining done in %s: %lld steps, %s train images/s\n", human_duration(s.seconds).c_str(),
              static_cast<long long>(s.steps), human_count(s.train_images_per_second).c_str());
  if (s.best_val_top1 >= 0)
    std::printf("best validation top-1 %s (epoch %lld), last %s\n", percent(s.best_val_top1).c_str(),
                static_cast<long long>(s.best_epoch), percent(s.final_val_top1).c_str());
  std::printf("trainable parameters %s of %s (%s); peak memory %s\n", human_count(static_cast<double>(s.trainable_params)).c_str(),
              human_count(static_cast<double>(s.total_params)).c_str(),
              percent(static_cast<double>(s.trainable_params) / s.total_params, 3).c_str(),
              human_bytes(static_cast<double>(s.peak_memory)).c_str());
  std::printf("adapters: %s (best), %s (last); metrics: %s\n", (dir / Trainer::kBestAdapter).c_str(),
              (dir / Trainer::kLastAdapter).c_str(), (dir / Trainer::kMetrics).c_str());
  std::printf("next: loratune eval --model %s --adapter %s --data <held-out folder>\n", run.config.model.c_str(),
              (dir / Trainer::kBestAdapter).c_str());
}

}  // namespace

int run_train(const TrainCommand& command) {
  if (command.nproc > 1) return launch_local_workers(command.nproc, command.worker_args);
  return guarded([&] {
    cli::setup_logging();
    const TrainConfig config = load_train_config(command.config, command.overrides);
    TrainingRunOptions options;
    options.resume = command.resume;
    options.memory_budget = command.fit_memory.empty() ? 0 : parse_memory_size(command.fit_memory);
    options.zero_shot = zero_shot_head_initializer();
    options.class_prompts = class_prompt_maker();
    options.tokenize = text_tokenizer_for();
    options.stop_after_step = [](int64_t) { return g_interrupted.load(); };
    const WorkerEnvironment worker = worker_environment();
    std::unique_ptr<RunFolderLock> lock;
    if (worker.rank == 0) {
      lock = claim_run_folder(config, command.resume);  // before a log file goes into it
      cli::setup_logging(fs::path(config.output_dir) / "train.log");
    } else {
      spdlog::set_level(spdlog::level::warn);  // data-parallel: rank 0 reports for all
    }
    std::signal(SIGINT, on_interrupt);
    TrainingRun run;
    try {
      run = run_training(config, options);
    } catch (const Interrupted& e) {
      if (worker.rank != 0) return exit_code::kInterrupted;  // rank 0 says it
      throw Interrupted(std::string(e.what()) + "; resume with: " + resume_command(command, worker.world_size > 1));
    }
    std::signal(SIGINT, SIG_DFL);
    if (run.lead) print_result(run);
    return exit_code::kOk;
  });
}

}  // namespace loratune
