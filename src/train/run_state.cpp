// What a run keeps on disk: checkpoints that resume exactly, the metrics file, the adapters.
#include <ATen/core/grad_mode.h>
#include <fstream>

#include "common/torch_compat.h"
#include "loratune/adapter_binding.h"
#include "loratune/errors.h"
#include "common/files.h"
#include "common/fingerprint.h"
#include "loratune/optim.h"
#include "loratune/safetensors.h"
#include "loratune/trainer.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace loratune {
namespace {

constexpr const char* kCheckpointFormat = "loratune.checkpoint/1";

}  // namespace

json Trainer::adapter_training_record() const {
  json record = result_settings(config_.json);
  record["precision"] = precision_name(precision_);
  return record;
}

std::string Trainer::resume_fingerprint() const {
  const std::string text = adapter_training_record().dump() + "|" + model_.bundle().fingerprint;
  char hex[17];
  std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(hash_bytes(text.data(), text.size(), 7)));
  return hex;
}

void Trainer::save_adapter_to(const std::string& name) {
  if (!writes_files()) return;
  save_adapter(dir_ / name, adapter_from_model(model_, classes_, adapter_training_record()));
}

void Trainer::append_metrics(const json& line, Progress& p) {
  if (!writes_files()) return;
  std::ofstream out(dir_ / kMetrics, std::ios::app);
  out << line.dump(-1, ' ', false, json::error_handler_t::replace) << "\n";
  out.flush();
  if (!out) throw RuntimeFailure("cannot write " + (dir_ / kMetrics).string() + " (disk full?)");
  ++p.metrics_lines;
  reporter_->metrics_line(line);
}

void Trainer::save_checkpoint(const Progress& p) {
  if (!writes_files()) return;
  safetensors::Tensors tensors = optimizer_->state();
  for (const auto& t : trainable_) tensors["param." + t.name] = t.tensor;
  tensors["rng.cpu"] = compat::default_generator(c10::Device(c10::kCPU)).get_state();
  if (device_.is_cuda()) tensors["rng.device"] = compat::default_generator(device_).get_state();
  const json progress = {{"step", p.step},
                         {"epoch", p.epoch},
                         {"step_in_epoch", p.step_in_epoch},
                         {"metrics_lines", p.metrics_lines},
                         {"nonfinite_streak", p.nonfinite_streak},
                         {"best_top1", p.best_top1},
                         {"best_epoch", p.best_epoch},
                         {"stopped_early", p.stopped_early},
                         {"loss_scale", scaler_->scale()},
                         {"loss_scale_growth_tracker", scaler_->growth_tracker()}};
  safetensors::write(dir_ / kCheckpoint, tensors,
                     {{"format", kCheckpointFormat}, {"progress", progress.dump()}, {"resume_fingerprint", resume_fingerprint()}});
}

Trainer::Progress Trainer::load_checkpoint() {
  const fs::path path = dir_ / kCheckpoint;
  const auto ckpt = safetensors::read(path);
  if (ckpt.metadata.count("format") == 0 || ckpt.metadata.at("format") != kCheckpointFormat)
    throw InputError(path.string() + " is not a loratune checkpoint");
  if (ckpt.metadata.at("resume_fingerprint") != resume_fingerprint())
    throw InputError(path.string() + " was written with another configuration or base model; resuming needs the same "
                     "settings (only output_dir, device, threads, data loading and logging may change). Compare with " +
                     (dir_ / kConfig).string() + ", or start a new run in another output_dir");
  const json progress = json::parse(ckpt.metadata.at("progress"));
  {
    at::NoGradGuard no_grad;
    for (auto& t : trainable_) {
      auto it = ckpt.tensors.find("param." + t.name);
      if (it == ckpt.tensors.end()) throw InputError(path.string() + " has no tensor for " + t.name);
      t.tensor.copy_(it->second);
    }
  }
  optimizer_->load_state(ckpt.tensors);
  compat::default_generator(c10::Device(c10::kCPU)).set_state(ckpt.tensors.at("rng.cpu"));
  if (device_.is_cuda() && ckpt.tensors.count("rng.device"))
    compat::default_generator(device_).set_state(ckpt.tensors.at("rng.device"));
  scaler_->restore(progress.at("loss_scale"), progress.at("loss_scale_growth_tracker"));
  Progress p;
  p.step = progress.at("step");
  p.epoch = progress.at("epoch");
  p.step_in_epoch = progress.at("step_in_epoch");
  p.metrics_lines = progress.at("metrics_lines");
  p.nonfinite_streak = progress.at("nonfinite_streak");
  p.best_top1 = progress.at("best_top1");
  p.best_epoch = progress.at("best_epoch");
  p.stopped_early = progress.value("stopped_early", false);

  // Metrics written after the checkpoint belong to the lost part of the run.
  std::vector<std::string> lines;
  {
    std::ifstream in(dir_ / kMetrics);
    std::string line;
    while (static_cast<int64_t>(lines.size()) < p.metrics_lines && std::getline(in, line)) lines.push_back(line);
  }
  std::string kept;
  for (const auto& line : lines) kept += line + "\n";
  if (writes_files()) write_file_atomic(dir_ / kMetrics, kept);
  return p;
}

}  // namespace loratune
