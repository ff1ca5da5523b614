#include <fstream>

#include "cli/common.h"
#include "loratune/commands.h"
#include "loratune/errors.h"
#include "loratune/files.h"
#include "loratune/plot.h"
#include "loratune/text.h"
#include "loratune/trainer.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace loratune {

int run_report(const ReportCommand& command) {
  return guarded([&] {
    cli::setup_logging();
    const fs::path dir = command.run_dir;
    const fs::path metrics_path = dir / Trainer::kMetrics;
    if (!fs::exists(metrics_path))
      throw InputError(dir.string() + " is not a training run folder (no " + Trainer::kMetrics + ")");
    Series loss{"train loss", {}, {}}, smooth{"moving average", {}, {}}, lr{"learning rate", {}, {}};
    Series val_acc{"validation top-1 (%)", {}, {}}, val_loss{"validation loss", {}, {}};
    std::ifstream in(metrics_path);
    std::string line;
    int64_t line_no = 0;
    // Debiased exponential moving average (as TensorBoard's smoothing), drawn for long runs only.
    constexpr double kSmoothing = 0.9;
    double ema = 0.0, ema_weight = 0.0;
    while (std::getline(in, line)) {
      ++line_no;
      if (line.empty()) continue;
      json j;
      try {
        j = json::parse(line);
      } catch (const json::exception&) {
        throw InputError(metrics_path.string() + ":" + std::to_string(line_no) + ": not a JSON line");
      }
      const std::string type = j.value("type", "");
      const double step = j.value("step", 0.0);
      if (type == "train" && j.contains("loss") && j["loss"].is_number()) {
        const double l = j["loss"];
        loss.x.push_back(step), loss.y.push_back(l);
        ema = kSmoothing * ema + (1 - kSmoothing) * l;
        ema_weight = kSmoothing * ema_weight + (1 - kSmoothing);
        smooth.x.push_back(step), smooth.y.push_back(ema / ema_weight);
        lr.x.push_back(step), lr.y.push_back(j.value("lr", 0.0));
      } else if (type == "val") {
        val_acc.x.push_back(j.value("epoch", 0.0)), val_acc.y.push_back(100.0 * j.value("val_top1", 0.0));
        val_loss.x.push_back(j.value("epoch", 0.0)), val_loss.y.push_back(j.value("val_loss", 0.0));
      }
    }
    const fs::path out = command.output.empty() ? dir : fs::path(command.output);
    fs::create_directories(out);
    std::vector<Series> loss_series{loss};
    if (loss.y.size() >= 40) loss_series.push_back(smooth);
    write_line_chart(out / "loss.png", loss_series, {"training loss", "optimiser step", "cross-entropy", false});
    write_line_chart(out / "lr.png", {lr}, {"learning rate", "optimiser step", "learning rate", false});
    write_line_chart(out / "val_accuracy.png", {val_acc}, {"validation top-1 accuracy", "epoch", "top-1 (%)", false});
    write_line_chart(out / "val_loss.png", {val_loss}, {"validation loss", "epoch", "cross-entropy", false});

    std::printf("run %s\n", dir.c_str());
    if (fs::exists(dir / Trainer::kSummary)) {
      const json s = json::parse(read_file(dir / Trainer::kSummary));
      std::printf("  method %s, %lld steps, %lld epochs, %s, %s\n", s.value("method", "?").c_str(),
                  static_cast<long long>(s.value("steps", 0)), static_cast<long long>(s.value("epochs", 0)),
                  human_duration(s.value("seconds", 0.0)).c_str(), s.value("precision", "?").c_str());
      std::printf("  trainable parameters %s of %s; peak memory %s\n",
                  human_count(s.value("trainable_params", 0.0)).c_str(), human_count(s.value("total_params", 0.0)).c_str(),
                  human_bytes(s.value("peak_memory_bytes", 0.0)).c_str());
    } else {
      std::printf("  (no summary.json: the run has not finished)\n");
    }
    if (!loss.y.empty())
      std::printf("  train loss: first %.4f, last %.4f (smoothed %.4f)\n", loss.y.front(), loss.y.back(), smooth.y.back());
    if (!val_acc.y.empty()) {
      const auto best = std::max_element(val_acc.y.begin(), val_acc.y.end()) - val_acc.y.begin();
      std::printf("  validation top-1: best %.2f%% at epoch %g, last %.2f%%\n", val_acc.y[best], val_acc.x[best], val_acc.y.back());
    }
    std::printf("  plots: %s, %s, %s, %s\n", (out / "loss.png").c_str(), (out / "lr.png").c_str(),
                (out / "val_accuracy.png").c_str(), (out / "val_loss.png").c_str());
    return exit_code::kOk;
  });
}

}  // namespace loratune
