#include <csignal>

#include <spdlog/spdlog.h>

#include "cli/common.h"
#include "cli/commands.h"
#include "loratune/device.h"
#include "loratune/errors.h"
#include "loratune/files.h"
#include "loratune/memory.h"
#include "loratune/strings.h"
#include "loratune/trainer.h"

namespace fs = std::filesystem;

namespace loratune {
namespace {

void on_interrupt(int) {
  Trainer::request_stop();
  std::signal(SIGINT, SIG_DFL);  // a second Ctrl-C stops at once
}

// The model as `train` sets it up: seeded adapters and head, frozen weights in `frozen_dtype`, on `device`.
std::unique_ptr<Model> build_model(const TrainConfig& c, const std::vector<std::string>& classes, const c10::Device& device,
                                   at::ScalarType frozen_dtype, bool report) {
  auto model = build_training_model(c, static_cast<int64_t>(classes.size()));
  if (report && c.method == Method::kLora) {
    const auto& targets = model->adapters();
    spdlog::info("LoRA on {} weights (rank {}, alpha {}{}):", targets.size(), c.lora.rank, c.lora.alpha,
                 c.lora.rslora ? ", rsLoRA" : "");
    for (const auto& t : targets) spdlog::info("  {}", t.describe());
    for (const auto& note : model->host().notes()) spdlog::warn("{}", note);
  }
  if (c.head.init == "zero_shot") cli::apply_zero_shot_head(*model, classes, c.head.text_model, c.head.class_names, c.head.templates);
  model->to(device, frozen_dtype);
  if (report) {
    const int64_t trainable = model->trainable_count(), total = model->total_count();
    spdlog::info("method {}: {} trainable of {} parameters ({})", method_name(c.method), human_count(static_cast<double>(trainable)),
                 human_count(static_cast<double>(total)), cli::percent(static_cast<double>(trainable) / total, 3));
    if (!model->bundle().has_block_structure() && c.gradient_checkpointing)
      spdlog::warn("the model has no stem/blocks/head structure: gradient checkpointing is off");
  }
  return model;
}

// One forward and backward pass on a small batch: catches models whose traced graphs fix a dtype and break with
// frozen weights stored in 16 bits.
std::string probe_training_step(Model& model, const c10::Device& device, Precision precision, bool checkpoint) {
  try {
    const int64_t s = model.bundle().info.image_size;
    const at::Tensor x = at::zeros({1, 3, s, s}, at::TensorOptions().device(device));
    at::Tensor logits;
    {
      AutocastScope autocast(device, precision);
      logits = model.logits(x, checkpoint);
    }
    logits.to(at::kFloat).sum().backward();
    for (auto& t : model.trainable())
      if (t.tensor.grad().defined()) t.tensor.mutable_grad().zero_();
    return "";
  } catch (const std::exception& e) {
    // The last line of a TorchScript error says what went wrong; the lines above are its traceback.
    std::string text = e.what();
    while (!text.empty() && (text.back() == '\n' || text.back() == ' ')) text.pop_back();
    const size_t newline = text.rfind('\n');
    return (newline == std::string::npos ? text : text.substr(newline + 1)).substr(0, 300);
  }
}

}  // namespace

int run_train(const TrainCommand& command) {
  return guarded([&] {
    cli::setup_logging();
    const TrainConfig c = load_train_config(command.config, command.overrides);
    const bool has_checkpoint = fs::exists(fs::path(c.output_dir) / Trainer::kCheckpoint);
    if (command.resume && !has_checkpoint)
      throw InputError("nothing to resume: " + (fs::path(c.output_dir) / Trainer::kCheckpoint).string() +
                       " does not exist; run without --resume");
    if (!command.resume && has_checkpoint)
      throw InputError(c.output_dir + " already holds a run; continue it with --resume, or set output_dir to a new folder");
    cli::setup_logging(fs::path(c.output_dir) / "train.log");
    cli::setup_threads(c.threads);
    const c10::Device device = resolve_device(c.device);
    const Precision precision = resolve_precision(c.precision, device);

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

    const bool mixed = precision != Precision::kFp32;
    const bool compact = c.frozen_dtype == "compute" || (c.frozen_dtype == "auto" && mixed && device.is_cuda());
    at::ScalarType frozen = compact && mixed && c.method != Method::kFull ? compute_dtype(precision) : at::kFloat;
    const auto& classes = train_folder.classes;
    auto model = build_model(c, classes, device, frozen, true);
    if (frozen != at::kFloat) {
      const std::string problem = probe_training_step(*model, device, precision, c.gradient_checkpointing);
      if (!problem.empty()) {
        spdlog::warn("frozen weights stay in fp32: the model fails with {}-stored weights ({})", precision_name(precision), problem);
        frozen = at::kFloat;
        model = build_model(c, classes, device, frozen, false);
      } else {
        spdlog::info("frozen base weights stored as {}", precision_name(precision));
      }
    }
    spdlog::info("device {}, precision {}, batch {} x {} accumulation, gradient checkpointing {}", device.str(),
                 precision_name(precision), c.batch_size, c.grad_accum_steps, c.gradient_checkpointing ? "on" : "off");

    const Preprocess preprocess = Preprocess::from_bundle(model->bundle().info);
    LoaderOptions train_options;
    train_options.batch_size = c.batch_size;
    train_options.shuffle = train_options.augment = true;  // the last, smaller batch trains too
    train_options.augmentation = c.data.augment;
    train_options.seed = c.seed;
    train_options.workers = c.data.workers;
    train_options.prefetch_batches = c.data.prefetch_batches;
    train_options.cache = c.data.cache;
    train_options.pin_memory = device.is_cuda();
    train_options.max_image_pixels = c.data.max_image_pixels;
    LoaderOptions val_options = train_options;
    val_options.shuffle = val_options.augment = false;
    ImageBatchSource train(train_folder, preprocess, train_options);
    std::unique_ptr<ImageBatchSource> val;
    if (!val_folder.samples.empty()) val = std::make_unique<ImageBatchSource>(val_folder, preprocess, val_options);

    Trainer trainer(c, *model, train, val.get(), train_folder.classes, device, precision);
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
