// What a run keeps on disk: checkpoints that resume exactly, the metrics file, the adapters.
#include <ATen/core/grad_mode.h>
#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <map>
#include <mutex>

#include <spdlog/fmt/fmt.h>

#include "common/torch_compat.h"
#include "loratune/adapter_binding.h"
#include "loratune/errors.h"
#include "common/files.h"
#include "common/fingerprint.h"
#include "common/strings.h"
#include "loratune/optim.h"
#include "loratune/safetensors.h"
#include "train/trainer_impl.h"
#include "train/checkpoint.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace loratune {
namespace {

constexpr const char* kLockFile = ".lock";

// This process's locks: folder -> (descriptor, holders).
std::mutex g_locks_mutex;
std::map<fs::path, std::pair<int, int>> g_locks;

}  // namespace

RunFolderLock::RunFolderLock(const fs::path& output_dir) {
  std::error_code ec;
  fs::create_directories(output_dir, ec);
  if (ec) throw InputError("cannot create output_dir " + output_dir.string() + ": " + ec.message());
  key_ = fs::weakly_canonical(fs::absolute(output_dir), ec);
  std::lock_guard<std::mutex> guard(g_locks_mutex);
  if (auto it = g_locks.find(key_); it != g_locks.end()) {
    ++it->second.second;
    return;
  }
  const fs::path path = key_ / kLockFile;
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) throw InputError("cannot open " + path.string() + ": " + std::strerror(errno));
  if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    char pid[32] = {};
    const ssize_t n = ::pread(fd, pid, sizeof pid - 1, 0);
    ::close(fd);
    const std::string holder = n > 0 ? std::string(pid, static_cast<size_t>(n)) : "?";
    throw InputError(output_dir.string() + " is in use by another training run (process " +
                     holder.substr(0, holder.find('\n')) + "); wait for it to end or stop it, or set output_dir to "
                     "another folder");
  }
  const std::string me = std::to_string(::getpid()) + "\n";
  // Who holds it, for the next one's message; the lock holds without this note.
  [[maybe_unused]] const bool noted =
      ::ftruncate(fd, 0) == 0 && ::pwrite(fd, me.data(), me.size(), 0) == static_cast<ssize_t>(me.size());
  g_locks[key_] = {fd, 1};
}

RunFolderLock::~RunFolderLock() {
  std::lock_guard<std::mutex> guard(g_locks_mutex);
  auto it = g_locks.find(key_);
  if (it == g_locks.end() || --it->second.second > 0) return;
  ::close(it->second.first);  // releases the lock
  g_locks.erase(it);
}

json Trainer::Impl::adapter_training_record() const {
  json record = result_settings(config_json(config_));
  record["precision"] = precision_name(precision_);
  return record;
}

std::string Trainer::Impl::base_fingerprint() const {
  return model_.bundle().fingerprint + (model_.has_text_tower() ? "|" + model_.text_bundle().fingerprint : "");
}

namespace {

// Checkpoints written before the settings were recorded in them held only this hash of the settings record and the
// base fingerprint.
std::string legacy_resume_fingerprint(const json& record, const std::string& base) {
  const std::string text = record.dump() + "|" + base;
  char hex[17];
  std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(hash_bytes(text.data(), text.size(), 7)));
  return hex;
}

}  // namespace

void Trainer::Impl::check_resumable(const std::map<std::string, std::string>& metadata, const fs::path& path) const {
  const std::string fix = "; resuming needs the same settings (only output_dir, device, threads, data loading and "
                          "logging may change): restore them, or start a new run in another output_dir";
  json recorded;
  if (metadata.count("settings")) {
    if (metadata.count("base_fingerprint") == 0 || metadata.at("base_fingerprint") != base_fingerprint())
      throw InputError(path.string() + " was written for another base model" + fix);
    try {
      recorded = json::parse(metadata.at("settings"));
    } catch (const json::exception&) {
    }
    if (!recorded.is_object()) throw InputError(path.string() + ": its settings record is not a JSON object" + fix);
  } else {
    // An older checkpoint: the run folder's config.json holds the settings its hash covers.
    json document;
    try {
      document = json::parse(read_file(dir_ / kConfig));
    } catch (const std::exception&) {
    }
    if (document.is_object()) {
      recorded = result_settings(document);
      recorded["precision"] = precision_name(precision_);
    }
    if (metadata.count("resume_fingerprint") == 0 || !document.is_object() ||
        metadata.at("resume_fingerprint") != legacy_resume_fingerprint(recorded, base_fingerprint()))
      throw InputError(path.string() + " was written with another configuration or base model (compare with " +
                       (dir_ / kConfig).string() + ")" + fix);
  }
  const auto changed = changed_settings(recorded, adapter_training_record());
  if (!changed.empty())
    throw InputError(path.string() + " was written with other settings (recorded vs now: " + join(changed, "; ") + ")" +
                     fix);
}

void Trainer::Impl::save_adapter_to(const std::string& name) {
  if (!writes_files()) return;
  refresh_text_head();
  Adapter adapter = adapter_from_model(model_, classes_, adapter_training_record());
  if (contrastive_) adapter.prompts = prompts_.record;
  adapter.initial_head_weight = initial_head_weight_;
  adapter.initial_head_bias = initial_head_bias_;
  save_adapter(dir_ / name, adapter);
}

void Trainer::Impl::append_metrics(const json& line, Progress& p) {
  if (!writes_files()) return;
  std::ofstream out(dir_ / kMetrics, std::ios::app);
  out << line.dump(-1, ' ', false, json::error_handler_t::replace) << "\n";
  out.flush();
  if (!out) throw RuntimeFailure("cannot write " + (dir_ / kMetrics).string() + " (disk full?)");
  ++p.metrics_lines;
  reporter_->metrics_line(line);
}

void Trainer::Impl::save_checkpoint(const Progress& p) {
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
  write_checkpoint(dir_ / kCheckpoint, tensors,
                   {{"progress", progress.dump()},
                    {"settings", adapter_training_record().dump()},
                    {"base_fingerprint", base_fingerprint()}});
}

namespace {

// The checkpoint's progress record, every value checked against the run it is meant to continue.
class ProgressReader {
 public:
  ProgressReader(const fs::path& path, const std::string& text) : path_(path) {
    try {
      progress_ = json::parse(text);
    } catch (const json::exception&) {
      fail("its progress record is not JSON");
    }
    if (!progress_.is_object()) fail("its progress record is not a JSON object");
  }
  int64_t integer(const char* key, int64_t lo, int64_t hi) const {
    const json& v = field(key);
    if (!v.is_number_integer()) fail(std::string("progress ") + key + " is not an integer");
    const int64_t x = v.is_number_unsigned() && v.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX)
                          ? INT64_MAX : v.get<int64_t>();
    if (x < lo || x > hi)
      fail(fmt::format("progress {} = {} is outside [{}, {}] for this run", key, x, lo, hi));
    return x;
  }
  double number(const char* key, double lo, double hi) const {
    const json& v = field(key);
    if (!v.is_number() || !(v.get<double>() >= lo && v.get<double>() <= hi))
      fail(fmt::format("progress {} = {} is outside [{}, {}]", key, v.dump(), lo, hi));
    return v.get<double>();
  }
  bool flag(const char* key) const {
    const json& v = field(key);
    if (!v.is_boolean()) fail(std::string("progress ") + key + " is not true or false");
    return v.get<bool>();
  }
  [[noreturn]] void fail(const std::string& what) const {
    throw InputError(path_.string() + ": " + what + "; the file was edited, or the photo folders changed since it "
                     "was written: restore them, or start a new run in another output_dir");
  }

 private:
  const json& field(const char* key) const {
    if (!progress_.contains(key)) fail(std::string("its progress record has no ") + key);
    return progress_.at(key);
  }
  fs::path path_;
  json progress_;
};

}  // namespace

Trainer::Impl::Progress Trainer::Impl::load_checkpoint(const Schedule& schedule) {
  const fs::path path = dir_ / kCheckpoint;
  const auto ckpt = read_checkpoint(path);
  check_resumable(ckpt.metadata, path);
  if (ckpt.metadata.count("progress") == 0) throw InputError(path.string() + " has no progress record");
  const ProgressReader progress(path, ckpt.metadata.at("progress"));
  Progress p;
  p.step = progress.integer("step", 0, schedule.total_steps);
  p.epoch = progress.integer("epoch", 0, schedule.total_epochs);
  p.step_in_epoch = progress.integer("step_in_epoch", 0, p.epoch < schedule.total_epochs ? schedule.steps_in_epoch(p.epoch) : 0);
  if (p.step != std::min(p.epoch * schedule.steps_per_epoch + p.step_in_epoch, schedule.total_steps))
    progress.fail(fmt::format("progress step {} does not fall in epoch {} at step {} of {} per epoch", p.step,
                              p.epoch + 1, p.step_in_epoch, schedule.steps_per_epoch));
  p.metrics_lines = progress.integer("metrics_lines", 0, INT64_MAX);
  p.nonfinite_streak = progress.integer("nonfinite_streak", 0, p.step);
  p.best_top1 = progress.number("best_top1", -1, 1);
  p.best_epoch = progress.integer("best_epoch", -1, p.epoch);
  p.stopped_early = progress.flag("stopped_early");
  const double loss_scale = progress.number("loss_scale", std::numeric_limits<double>::min(), std::numeric_limits<float>::max());
  const int64_t growth_tracker = progress.integer("loss_scale_growth_tracker", 0, INT64_MAX);

  const std::string origin = path.string();
  const at::Tensor& rng_cpu =
      stored_like(ckpt.tensors, "rng.cpu", compat::default_generator(c10::Device(c10::kCPU)).get_state(), origin);
  const bool device_rng = device_.is_cuda() && ckpt.tensors.count("rng.device");
  const at::Tensor rng_device = device_rng ? stored_like(ckpt.tensors, "rng.device", compat::default_generator(device_).get_state(), origin)
                                           : at::Tensor();
  // A generator state of the right size can still be one LibTorch refuses: tried on copies before anything changes.
  for (auto [state, device] : {std::pair<const at::Tensor*, c10::Device>{&rng_cpu, c10::Device(c10::kCPU)},
                               {&rng_device, device_}}) {
    if (!state->defined()) continue;
    try {
      compat::default_generator(device).clone().set_state(*state);
    } catch (const c10::Error&) {
      throw InputError(origin + ": the random generator state (rng." + (device.is_cpu() ? "cpu" : "device") +
                       ") is not one LibTorch accepts; the checkpoint is damaged");
    }
  }
  std::vector<const at::Tensor*> params;
  for (const auto& t : trainable_) params.push_back(&stored_like(ckpt.tensors, "param." + t.name, t.tensor, origin));
  optimizer_->load_state(ckpt.tensors, origin);  // checks its own tensors before it changes anything
  {
    at::NoGradGuard no_grad;
    for (size_t i = 0; i < trainable_.size(); ++i) trainable_[i].tensor.copy_(*params[i]);
  }
  compat::default_generator(c10::Device(c10::kCPU)).set_state(rng_cpu);
  if (device_rng) compat::default_generator(device_).set_state(rng_device);
  scaler_->restore(loss_scale, growth_tracker);

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
