// The progress bars and log lines of `loratune train`, as a TrainingReporter.
#include <spdlog/spdlog.h>

#include <cstdio>
#include <memory>

#include "loratune/memory.h"
#include "common/progress.h"
#include "common/strings.h"
#include "loratune/trainer.h"

namespace loratune {
namespace {

std::string format_percent(double fraction) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2f%%", 100.0 * fraction);
  return buf;
}

class ConsoleReporter : public TrainingReporter {
 public:
  explicit ConsoleReporter(const c10::Device& device) : device_(device) {}

  void message(const std::string& text) override { spdlog::info("{}", text); }
  void warning(const std::string& text) override { spdlog::warn("{}", text); }

  void epoch_begin(int64_t epoch, int64_t epochs, int64_t images_total, int64_t images_done) override {
    bar_ = std::make_unique<ProgressBar>("epoch " + std::to_string(epoch + 1) + "/" + std::to_string(epochs),
                                         images_total, "img");
    bar_->restart_rate(images_done);
  }

  void step_end(const Step& s) override {
    char status[96];
    std::snprintf(status, sizeof status, "step %lld loss %.4f lr %.2e ", static_cast<long long>(s.step), s.loss, s.lr);
    if (bar_) bar_->update(s.images_done, status + memory_status(device_));
  }

  void epoch_end() override {
    if (bar_) bar_->finish();
    bar_.reset();
  }

  void validation_progress(int64_t done, int64_t total) override {
    if (!validation_bar_) validation_bar_ = std::make_unique<ProgressBar>("  validate", total, "img");
    validation_bar_->update(done, memory_status(device_));
  }

  void validation_end(const Validation& v) override {
    if (validation_bar_) validation_bar_->finish(memory_status(device_));
    validation_bar_.reset();
    spdlog::info("epoch {}/{}: val loss {:.4f}, top-1 {}{}", v.epoch, v.epochs, v.loss, format_percent(v.top1),
                 v.best ? " (best so far)" : "");
  }

 private:
  c10::Device device_;
  std::unique_ptr<ProgressBar> bar_, validation_bar_;
};

}  // namespace

std::shared_ptr<TrainingReporter> console_reporter(const c10::Device& device) {
  return std::make_shared<ConsoleReporter>(device);
}

}  // namespace loratune
