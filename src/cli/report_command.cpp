#include <algorithm>
#include <cmath>

#include "cli/common.h"
#include "cli/commands.h"
#include "common/files.h"
#include "common/strings.h"
#include "loratune/errors.h"
#include "loratune/trainer.h"
#include "plot/plot.h"
#include "report/report.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace loratune {
namespace {

// The run's numbers on the console, as the report's summary table shows them.
void print_run(const RunRecord& run) {
  std::printf("run %s\n", run.dir.c_str());
  const json& s = run.summary;
  if (s.is_object()) {
    auto number = [&](const char* key) { return s.contains(key) && s[key].is_number() ? s[key].get<double>() : std::nan(""); };
    auto text = [&](const char* key) { return s.contains(key) && s[key].is_string() ? s[key].get<std::string>() : "?"; };
    std::printf("  method %s, %.0f steps, %.0f epochs, %s, %s\n", text("method").c_str(), number("steps"),
                number("epochs"), human_duration(number("seconds")).c_str(), text("precision").c_str());
    std::printf("  trainable parameters %s of %s; peak memory %s\n", human_count(number("trainable_params")).c_str(),
                human_count(number("total_params")).c_str(), human_bytes(number("peak_memory_bytes")).c_str());
  } else {
    std::printf("  (no summary.json: the run has not finished)\n");
  }
  if (!run.loss.y.empty())
    std::printf("  train loss: first %.4f, last %.4f (smoothed %.4f)\n", run.loss.y.front(), run.loss.y.back(),
                run.smooth.y.back());
  const auto& acc = run.val_top1;
  if (!acc.y.empty()) {
    const auto best = std::max_element(acc.y.begin(), acc.y.end()) - acc.y.begin();
    std::printf("  validation top-1: best %.2f%% at epoch %g, last %.2f%%\n", acc.y[best], acc.x[best], acc.y.back());
  }
}

void write_plots(const RunRecord& run, const fs::path& dir) {
  std::vector<Series> loss{run.loss};
  if (run.loss.y.size() >= 40) loss.push_back(run.smooth);
  write_line_chart(dir / "loss.png", loss, {"training loss", "optimiser step", "cross-entropy", false});
  write_line_chart(dir / "lr.png", {run.lr}, {"learning rate", "optimiser step", "learning rate", false});
  write_line_chart(dir / "val_accuracy.png", {run.val_top1}, {"validation top-1 accuracy", "epoch", "top-1 (%)", false});
  write_line_chart(dir / "val_loss.png", {run.val_loss}, {"validation loss", "epoch", "cross-entropy", false});
  std::printf("  plots: %s, %s, %s, %s\n", (dir / "loss.png").c_str(), (dir / "lr.png").c_str(),
              (dir / "val_accuracy.png").c_str(), (dir / "val_loss.png").c_str());
}

}  // namespace

int run_report(const ReportCommand& command) {
  return guarded([&] {
    cli::setup_logging();
    std::vector<RunRecord> runs;
    std::vector<EvalRecord> evals;
    for (const std::string& source : command.sources) {
      if (is_run_folder(source)) runs.push_back(read_run(source));
      else if (is_eval_folder(source)) evals.push_back(read_eval(source));
      else if (!fs::exists(source)) throw InputError(source + " does not exist");
      else
        throw InputError(source + " is neither a training run folder (" + Trainer::kMetrics + ") nor an evaluation "
                         "folder (" + EvalFiles::kMetrics + " from loratune eval)");
    }
    for (const std::string& dir : command.evals) evals.push_back(read_eval(dir));

    // A .html path is the page alone; a folder gets report.html and, for one run, the PNG plots.
    const bool page_only = fs::path(command.output).extension() == ".html";
    const fs::path folder = command.output.empty() ? fs::path(command.sources.at(0)) : fs::path(command.output);
    const fs::path page = page_only ? folder : folder / EvalFiles::kReport;
    if (!page.parent_path().empty()) fs::create_directories(page.parent_path());
    for (const RunRecord& run : runs) {
      print_run(run);
      if (!page_only && runs.size() == 1) write_plots(run, folder);
    }
    const std::string html = render_report(runs, evals);
    write_file_atomic(page, html);
    std::printf("report: %s (%s)\n", page.c_str(), human_bytes(static_cast<double>(html.size())).c_str());
    return exit_code::kOk;
  });
}

}  // namespace loratune
