#include "loratune/training_run.h"

#include <spdlog/fmt/fmt.h>

#include "common/output_paths.h"
#include "common/strings.h"
#include "loratune/captions.h"
#include "loratune/device.h"
#include "loratune/errors.h"
#include "loratune/image_folder.h"
#include "loratune/loader.h"
#include "loratune/memory_plan.h"
#include "loratune/process_group.h"
#include "loratune/threads.h"

namespace loratune {
namespace {

std::string percent(double fraction) { return fmt::format("{:.3f}%", 100.0 * fraction); }

struct ScannedData {
  ImageFolder train, val;
  std::vector<std::vector<std::string>> captions;  // data.captions: each training photo's
};

// The training and validation folders: data.val, or a seeded split of data.train; with data.captions, the training
// photos that have captions, and theirs.
ScannedData scan_folders(const TrainConfig& c, TrainingReporter& reporter) {
  ScannedData data;
  ImageFolder& train = data.train;
  ImageFolder& val = data.val;
  train = scan_image_folder(c.data.train);
  if (c.data.val.empty()) {
    std::tie(train, val) = stratified_split(train, c.data.val_fraction, c.data.split_seed);
  } else {
    val = scan_image_folder_for(c.data.val, train.classes);
  }
  SkippedFiles caption_rows;
  if (!c.data.captions.empty()) {
    const CaptionFile captions = read_captions(c.data.captions, c.data.caption_column);
    caption_rows = captions.skipped;
    for (const auto& line : describe_skipped(captions.skipped, c.data.captions + " (rows)")) reporter.warning(line);
    reporter.message(fmt::format("{} captions of {} photos in {} (column \"{}\")", captions.caption_count(),
                                 captions.captions.size(), c.data.captions, captions.column));
    data.captions = attach_captions(train, captions);
  }
  for (const auto& line : describe_skipped(train.skipped, c.data.train)) reporter.warning(line);
  if (!c.data.val.empty())
    for (const auto& line : describe_skipped(val.skipped, c.data.val)) reporter.warning(line);
  // The caption file's skipped rows join the run's list of what it could not use (summary.json), as photos do.
  train.skipped.insert(train.skipped.end(), caption_rows.begin(), caption_rows.end());
  reporter.message(fmt::format("{} classes: {}", train.classes.size(), join(train.classes, ", ", 12)));
  reporter.message(fmt::format("{} training images, {} validation images ({})", train.samples.size(), val.samples.size(),
                               c.data.val.empty() ? "held out of " + c.data.train : c.data.val));
  return data;
}

// What the run adapts and trains.
void report_model(const TrainConfig& c, const TrainingSetup& setup, TrainingReporter& reporter) {
  const Model& model = *setup.model;
  if (c.method == Method::kLora) {
    reporter.message(fmt::format("LoRA on {} weights (rank {}, alpha {}{}):", model.adapters().size(), c.lora.rank,
                                 c.lora.alpha, c.lora.rslora ? ", rsLoRA" : ""));
    for (const auto& t : model.adapters()) reporter.message("  " + t.describe());
    if (model.has_text_tower()) {
      reporter.message(fmt::format("and on {} weights of the text tower {} (loss contrastive):",
                                   model.text_adapters().size(), model.text_bundle().path.filename().string()));
      for (const auto& t : model.text_adapters()) reporter.message("  " + t.describe());
    }
  }
  if (c.method == Method::kVpt)
    reporter.message(fmt::format("VPT-{}: {} prompt tokens before {}", c.vpt.deep ? "deep" : "shallow", c.vpt.tokens,
                                 c.vpt.deep ? fmt::format("each of the {} blocks", model.blocks().size())
                                            : std::string("the first block")));
  if (c.method == Method::kAdaptFormer)
    reporter.message(fmt::format("AdaptFormer: bottleneck {}, scale {} {} the MLP of each of the {} blocks",
                                 c.adaptformer.bottleneck, c.adaptformer.scale,
                                 c.adaptformer.sequential ? "after" : "beside", model.blocks().size()));
  const int64_t trainable = model.trainable_count(), total = model.total_count();
  reporter.message(fmt::format("method {}: {} trainable of {} parameters ({})", method_name(c.method),
                               human_count(static_cast<double>(trainable)), human_count(static_cast<double>(total)),
                               percent(static_cast<double>(trainable) / static_cast<double>(total))));
  if (!model.bundle().has_block_structure() && c.gradient_checkpointing)
    reporter.warning("the model has no stem/blocks/head structure: gradient checkpointing is off");
  if (const std::string note = model.dropout_note(); !note.empty()) reporter.warning(note);
  for (const auto& w : setup.warnings) reporter.warning(w);
  for (const auto& n : setup.notes) reporter.message(n);
  reporter.message(fmt::format("device {}, precision {}, batch {} x {} accumulation, gradient checkpointing {}",
                               setup.device.str(), precision_name(setup.precision), c.batch_size, c.grad_accum_steps,
                               c.gradient_checkpointing ? "on" : "off"));
}

}  // namespace

std::unique_ptr<RunFolderLock> claim_run_folder(const TrainConfig& config, bool resume) {
  refuse_output_over_inputs(config.output_dir, "output_dir", {config.model, config.data.train, config.data.val});
  auto lock = std::make_unique<RunFolderLock>(config.output_dir);
  check_run_folder(config.output_dir, resume);
  return lock;
}

TrainingRun run_training(const TrainConfig& config, const TrainingRunOptions& options) {
  TrainingRun run;
  run.config = config;
  TrainConfig& c = run.config;
  // Data-parallel worker: join the others; rank 0 reports and writes for all.
  const WorkerEnvironment worker = worker_environment();
  // Before any slow work; rank 0 writes for all.
  const std::unique_ptr<RunFolderLock> lock = worker.rank == 0 ? claim_run_folder(c, options.resume) : nullptr;
  if (!lock) check_run_folder(c.output_dir, options.resume);
  std::unique_ptr<ProcessGroup> group;
  if (worker.world_size > 1) {
    group = ProcessGroup::join(worker, distributed_timeout());
    if (c.device.rfind("cuda", 0) == 0 && c.device.find(':') == std::string::npos)
      c.device = "cuda:" + std::to_string(worker.local_rank);
    run.lead = group->rank() == 0;
  }
  const auto reporter = !run.lead ? std::make_shared<TrainingReporter>()
                        : options.reporter ? options.reporter
                                           : console_reporter(resolve_device(c.device));
  if (group)
    reporter->message(fmt::format("data-parallel worker {} of {} (Gloo, {})", group->rank(), group->size(),
                                  worker.rendezvous()));
  const ComputeThreadsScope threads(c.threads);  // the caller's count comes back when the run ends
  ScannedData data = scan_folders(c, *reporter);  // a bad folder fails before any model work
  const ImageFolder& train_folder = data.train;
  const ImageFolder& val_folder = data.val;

  if (options.memory_budget > 0) {
    reporter->message(fmt::format("fitting the run to {}: measuring small training steps for each setting...",
                                  human_bytes(static_cast<double>(options.memory_budget))));
    const FitResult fit = fit_memory(c, static_cast<int64_t>(train_folder.classes.size()), options.memory_budget);
    if (!fit.fit) throw RuntimeFailure(fit.failure);
    run.fit_overrides = fit.fit->overrides;
    c = with_overrides(c, run.fit_overrides);
    reporter->message(fmt::format("fits in {} (predicted peak {}): --set {}",
                                  human_bytes(static_cast<double>(options.memory_budget)),
                                  human_bytes(static_cast<double>(planned_bytes(fit.fit->estimate, resolve_device(c.device)))),
                                  join(run.fit_overrides, " --set ")));
    if (const std::string cost = fit_cost_note(*fit.fit); !cost.empty()) reporter->message(cost);
  }
  TrainingSetup setup = prepare_training(c, train_folder.classes, options.zero_shot);
  if (group)
    for (LoaderOptions* o : {&setup.train_loader, &setup.val_loader}) {
      o->shard_index = group->rank();
      o->shard_count = group->size();
    }
  report_model(c, setup, *reporter);

  const Preprocess preprocess = Preprocess::from_bundle(setup.model->bundle().info);
  ImageBatchSource train(train_folder, preprocess, setup.train_loader);
  std::unique_ptr<ImageBatchSource> val;
  if (!val_folder.samples.empty()) val = std::make_unique<ImageBatchSource>(val_folder, preprocess, setup.val_loader);
  TrainerHooks hooks;
  hooks.data_parallel = group.get();
  hooks.reporter = reporter;
  hooks.stop_after_step = options.stop_after_step;
  hooks.class_prompts = options.class_prompts;
  hooks.text_head = options.zero_shot;
  hooks.captions = std::move(data.captions);
  hooks.tokenize = options.tokenize;
  Trainer trainer(c, *setup.model, train, val.get(), train_folder.classes, setup.device, setup.precision, hooks);
  run.summary = trainer.run(options.resume);
  return run;
}

}  // namespace loratune
