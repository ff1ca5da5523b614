#include <cmath>
#include <fstream>

#include "cli/common.h"
#include "cli/commands.h"
#include "loratune/errors.h"
#include "common/files.h"
#include "plot/plot.h"
#include "common/strings.h"
#include "loratune/trainer.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace loratune {
namespace {

// A number field of a metrics or summary line; NaN when missing, null (NaN written by JSON) or not a number.
double number(const nlohmann::json& j, const char* key) {
  return j.contains(key) && j[key].is_number() ? j[key].get<double>() : std::nan("");
}

}  // namespace

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
      if (!j.is_object()) throw InputError(metrics_path.string() + ":" + std::to_string(line_no) + ": not a JSON object");
      const json type = j.value("type", json());
      const double step = number(j, "step");
      // A diverged run writes NaN losses as null: those points are left out of the plots.
      if (type == "train" && std::isfinite(number(j, "loss"))) {
        const double l = number(j, "loss");
        loss.x.push_back(step), loss.y.push_back(l);
        ema = kSmoothing * ema + (1 - kSmoothing) * l;
        ema_weight = kSmoothing * ema_weight + (1 - kSmoothing);
        smooth.x.push_back(step), smooth.y.push_back(ema / ema_weight);
        if (std::isfinite(number(j, "lr"))) lr.x.push_back(step), lr.y.push_back(number(j, "lr"));
      } else if (type == "val") {
        const double epoch = number(j, "epoch");
        if (std::isfinite(number(j, "val_top1"))) val_acc.x.push_back(epoch), val_acc.y.push_back(100.0 * number(j, "val_top1"));
        if (std::isfinite(number(j, "val_loss"))) val_loss.x.push_back(epoch), val_loss.y.push_back(number(j, "val_loss"));
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
      json s;
      try {
        s = json::parse(read_file(dir / Trainer::kSummary));
      } catch (const json::exception& e) {
        throw InputError((dir / Trainer::kSummary).string() + ": not valid JSON (" + e.what() + ")");
      }
      auto text = [&](const char* key) { return s.contains(key) && s[key].is_string() ? s[key].get<std::string>() : "?"; };
      std::printf("  method %s, %.0f steps, %.0f epochs, %s, %s\n", text("method").c_str(), number(s, "steps"),
                  number(s, "epochs"), human_duration(number(s, "seconds")).c_str(), text("precision").c_str());
      std::printf("  trainable parameters %s of %s; peak memory %s\n", human_count(number(s, "trainable_params")).c_str(),
                  human_count(number(s, "total_params")).c_str(), human_bytes(number(s, "peak_memory_bytes")).c_str());
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
