#include <csignal>

#include <spdlog/spdlog.h>

#include "cli/common.h"
#include "loratune/zero_shot.h"
#include "cli/commands.h"
#include "loratune/device.h"
#include "loratune/errors.h"
#include "common/files.h"
#include "loratune/memory.h"
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
  return guarded([&] {
    cli::setup_logging();
    const TrainConfig c = load_train_config(command.config, command.overrides);
    check_run_folder(c.output_dir, command.resume);  // before any slow work
    cli::setup_logging(fs::path(c.output_dir) / "train.log");
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

    TrainingSetup setup = prepare_training(c, train_folder.classes, zero_shot_head_initializer());
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

    Trainer trainer(c, model, train, val.get(), train_folder.classes, setup.device, setup.precision);
    std::signal(SIGINT, on_interrupt);
    TrainSummary s;
    try {
      s = trainer.run(command.resume);
    } catch (const Interrupted& e) {
      std::string again = "loratune train";
      if (!command.config.empty()) again += " --config " + command.config;
      for (const auto& o : command.overrides) again += " --set " + o;
      throw Interrupted(std::string(e.what()) + "; resume with: " + again + " --resume");
    }
    std::signal(SIGINT, SIG_DFL);
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
