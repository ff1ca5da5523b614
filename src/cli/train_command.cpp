#include <csignal>

#include <spdlog/spdlog.h>

#include "cli/common.h"
#include "loratune/zero_shot.h"
#include "cli/commands.h"
#include "loratune/device.h"
#include "loratune/errors.h"
#include "common/files.h"
#include "loratune/memory.h"
#include "loratune/memory_plan.h"
#include "loratune/process_group.h"
#include "common/strings.h"
#include "loratune/trainer.h"
#include "loratune/training_setup.h"

namespace fs = std::filesystem;

namespace loratune {
namespace {

void on_interrupt(int) {
  Trainer::request_stop();
  std::signal(SIGINT, SIG_DFL);  // a second Ctrl-C stops at once
}

// What the run adapts and trains, as log lines.
void log_model(const TrainConfig& c, const Model& model) {
  if (c.method == Method::kLora) {
    const auto& targets = model.adapters();
    spdlog::info("LoRA on {} weights (rank {}, alpha {}{}):", targets.size(), c.lora.rank, c.lora.alpha,
                 c.lora.rslora ? ", rsLoRA" : "");
    for (const auto& t : targets) spdlog::info("  {}", t.describe());
  }
  const int64_t trainable = model.trainable_count(), total = model.total_count();
  spdlog::info("method {}: {} trainable of {} parameters ({})", method_name(c.method),
               human_count(static_cast<double>(trainable)), human_count(static_cast<double>(total)),
               cli::percent(static_cast<double>(trainable) / total, 3));
  if (!model.bundle().has_block_structure() && c.gradient_checkpointing)
    spdlog::warn("the model has no stem/blocks/head structure: gradient checkpointing is off");
}

}  // namespace

int run_train(const TrainCommand& command) {
  if (command.nproc > 1) return launch_local_workers(command.nproc, command.worker_args);
  return guarded([&] {
    cli::setup_logging();
    TrainConfig c = load_train_config(command.config, command.overrides);
    const int64_t memory_budget = command.fit_memory.empty() ? 0 : parse_memory_size(command.fit_memory);
    check_run_folder(c.output_dir, command.resume);  // before any slow work
    // Data-parallel worker (torchrun or --nproc): join the others; rank 0 logs and writes, the rest warn only.
    const WorkerEnvironment worker = worker_environment();
    std::unique_ptr<ProcessGroup> group;
    if (worker.world_size > 1) {
      group = ProcessGroup::join(worker, distributed_timeout());
      if (c.device.rfind("cuda", 0) == 0 && c.device.find(':') == std::string::npos)
        c.device = "cuda:" + std::to_string(worker.local_rank);
      if (group->rank() != 0) spdlog::set_level(spdlog::level::warn);
    }
    if (!group || group->rank() == 0) cli::setup_logging(fs::path(c.output_dir) / "train.log");
    if (group) spdlog::info("data-parallel worker {} of {} (Gloo, {}:{})", group->rank(), group->size(), worker.master_addr,
                            worker.master_port);
    cli::setup_threads(c.threads);
    // Data first: a bad folder should fail before any model work.
    ImageFolder train_folder = scan_image_folder(c.data.train), val_folder;
    if (c.data.val.empty()) {
      std::tie(train_folder, val_folder) = stratified_split(train_folder, c.data.val_fraction, c.data.split_seed);
    } else {
      val_folder = scan_image_folder_for(c.data.val, train_folder.classes);
    }
    log_skipped(train_folder.skipped, c.data.train);
    if (!c.data.val.empty()) log_skipped(val_folder.skipped, c.data.val);
    spdlog::info("{} classes: {}", train_folder.classes.size(), join(train_folder.classes, ", ", 12));
    spdlog::info("{} training images, {} validation images ({})", train_folder.samples.size(), val_folder.samples.size(),
                 c.data.val.empty() ? "held out of " + c.data.train : c.data.val);

    if (memory_budget > 0) {
      spdlog::info("fitting the run to {}: measuring small training steps for each setting...",
                   human_bytes(static_cast<double>(memory_budget)));
      const FitResult fit = fit_memory(c, static_cast<int64_t>(train_folder.classes.size()), memory_budget);
      if (!fit.fit) throw RuntimeFailure(fit.failure);
      auto overrides = command.overrides;
      overrides.insert(overrides.end(), fit.fit->overrides.begin(), fit.fit->overrides.end());
      c = load_train_config(command.config, overrides);
      spdlog::info("fits in {} (predicted peak {}): --set {}", human_bytes(static_cast<double>(memory_budget)),
                   human_bytes(static_cast<double>(planned_bytes(fit.fit->estimate, resolve_device(c.device)))),
                   join(fit.fit->overrides, " --set "));
    }
    TrainingSetup setup = prepare_training(c, train_folder.classes, zero_shot_head_initializer());
    if (group) {
      for (LoaderOptions* o : {&setup.train_loader, &setup.val_loader}) {
        o->shard_index = group->rank();
        o->shard_count = group->size();
      }
    }
    Model& model = *setup.model;
    log_model(c, model);
    for (const auto& note : model.host().notes()) spdlog::warn("{}", note);
    for (const auto& w : setup.warnings) spdlog::warn("{}", w);
    for (const auto& n : setup.notes) spdlog::info("{}", n);
    spdlog::info("device {}, precision {}, batch {} x {} accumulation, gradient checkpointing {}", setup.device.str(),
                 precision_name(setup.precision), c.batch_size, c.grad_accum_steps, c.gradient_checkpointing ? "on" : "off");

    const Preprocess preprocess = Preprocess::from_bundle(model.bundle().info);
    ImageBatchSource train(train_folder, preprocess, setup.train_loader);
    std::unique_ptr<ImageBatchSource> val;
    if (!val_folder.samples.empty()) val = std::make_unique<ImageBatchSource>(val_folder, preprocess, setup.val_loader);

    TrainerHooks hooks;
    if (group) {
      hooks.data_parallel = group.get();
      if (group->rank() != 0) hooks.reporter = std::make_shared<TrainingReporter>();  // rank 0 reports for all
    }
    Trainer trainer(c, model, train, val.get(), train_folder.classes, setup.device, setup.precision, hooks);
    std::signal(SIGINT, on_interrupt);
    TrainSummary s;
    try {
      s = trainer.run(command.resume);
    } catch (const Interrupted& e) {
      if (group && group->rank() != 0) return exit_code::kInterrupted;  // rank 0 says it
      std::string again = "loratune train";
      if (!command.config.empty()) again += " --config " + command.config;
      for (const auto& o : command.overrides) again += " --set " + o;
      if (const char* nproc = std::getenv("LORATUNE_NPROC")) again += std::string(" --nproc ") + nproc;
      else if (group) again = "the same torchrun command with " + again;
      throw Interrupted(std::string(e.what()) + "; resume with: " + again + " --resume");
    }
    std::signal(SIGINT, SIG_DFL);
    if (group && group->rank() != 0) return exit_code::kOk;
    log_skipped(s.skipped_files, "data");
    const fs::path dir = c.output_dir;
    std::printf("\ntraining done in %s: %lld steps, %s train images/s\n", human_duration(s.seconds).c_str(),
                static_cast<long long>(s.steps), human_count(s.train_images_per_second).c_str());
    if (s.best_val_top1 >= 0)
      std::printf("best validation top-1 %s (epoch %lld), last %s\n", cli::percent(s.best_val_top1).c_str(),
                  static_cast<long long>(s.best_epoch), cli::percent(s.final_val_top1).c_str());
    std::printf("trainable parameters %s of %s (%s); peak memory %s\n", human_count(static_cast<double>(s.trainable_params)).c_str(),
                human_count(static_cast<double>(s.total_params)).c_str(),
                cli::percent(static_cast<double>(s.trainable_params) / s.total_params, 3).c_str(),
                human_bytes(static_cast<double>(s.peak_memory)).c_str());
    std::printf("adapters: %s (best), %s (last); metrics: %s\n", (dir / Trainer::kBestAdapter).c_str(),
                (dir / Trainer::kLastAdapter).c_str(), (dir / Trainer::kMetrics).c_str());
    std::printf("next: loratune eval --model %s --adapter %s --data <held-out folder>\n", c.model.c_str(),
                (dir / Trainer::kBestAdapter).c_str());
    return exit_code::kOk;
  });
}

}  // namespace loratune
