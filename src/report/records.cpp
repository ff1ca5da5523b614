#include "report/records.h"

#include <cmath>
#include <fstream>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <sstream>

#include "common/files.h"
#include "common/strings.h"
#include "loratune/errors.h"
#include "loratune/trainer.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace loratune {
namespace {

// A number field of a metrics or summary line; NaN when missing, null (NaN written by JSON) or not a number.
double number(const json& j, const char* key) {
  return j.contains(key) && j[key].is_number() ? j[key].get<double>() : std::nan("");
}

json read_json(const fs::path& path) {
  try {
    return json::parse(read_file(path));
  } catch (const json::exception& e) {
    throw InputError(path.string() + ": not valid JSON (" + e.what() + ")");
  }
}

const json& field(const json& j, const char* key, bool (json::*is)() const, const char* kind, const fs::path& path) {
  if (!j.contains(key) || !(j[key].*is)()) throw InputError(path.string() + ": \"" + key + "\" is not " + kind);
  return j[key];
}

double fraction(const json& j, const char* key, const fs::path& path) {
  const double v = field(j, key, &json::is_number, "a number", path).get<double>();
  if (!(v >= 0 && v <= 1)) throw InputError(path.string() + ": \"" + key + "\" is not between 0 and 1");
  return v;
}

ClassificationMetrics metrics_from_json(const json& j, size_t classes, const fs::path& path) {
  ClassificationMetrics m;
  m.count = field(j, "count", &json::is_number_integer, "a whole number", path).get<int64_t>();
  m.loss = field(j, "loss", &json::is_number, "a number", path).get<double>();
  m.top1 = fraction(j, "top1", path);
  m.top5 = j.contains("top5") ? fraction(j, "top5", path) : -1;
  m.macro_precision = fraction(j, "macro_precision", path);
  m.macro_recall = fraction(j, "macro_recall", path);
  m.macro_f1 = fraction(j, "macro_f1", path);
  const json& per = field(j, "per_class", &json::is_array, "a list", path);
  const json& confusion = field(j, "confusion_matrix", &json::is_array, "a list", path);
  if (per.size() != classes || confusion.size() != classes)
    throw InputError(path.string() + ": per_class and confusion_matrix need one entry per class (" +
                     std::to_string(classes) + ")");
  for (const json& c : per) {
    if (!c.is_object()) throw InputError(path.string() + ": a per_class entry is not an object");
    m.per_class.push_back({fraction(c, "precision", path), fraction(c, "recall", path), fraction(c, "f1", path),
                           field(c, "support", &json::is_number_integer, "a whole number", path).get<int64_t>()});
  }
  for (const json& row : confusion) {
    if (!row.is_array() || row.size() != classes)
      throw InputError(path.string() + ": confusion_matrix is not " + std::to_string(classes) + "x" + std::to_string(classes));
    m.confusion.emplace_back();
    for (const json& v : row) {
      if (!v.is_number_integer() || v.get<int64_t>() < 0)
        throw InputError(path.string() + ": confusion_matrix holds something other than counts");
      m.confusion.back().push_back(v.get<int64_t>());
    }
  }
  if (j.contains("calibration")) {  // evaluation folders written before calibration was added have none
    for (const json& b : field(j, "calibration", &json::is_array, "a list", path)) {
      if (!b.is_object()) throw InputError(path.string() + ": a calibration entry is not an object");
      m.calibration.push_back({fraction(b, "lower", path), fraction(b, "upper", path),
                               field(b, "count", &json::is_number_integer, "a whole number", path).get<int64_t>(),
                               fraction(b, "confidence", path), fraction(b, "accuracy", path)});
    }
    m.ece = fraction(j, "ece", path);
  }
  return m;
}

}  // namespace

bool is_run_folder(const fs::path& dir) { return fs::is_regular_file(dir / Trainer::kMetrics); }

bool is_eval_folder(const fs::path& dir) { return fs::is_regular_file(dir / EvalFiles::kMetrics); }

RunRecord read_run(const fs::path& dir) {
  const fs::path metrics_path = dir / Trainer::kMetrics;
  if (!is_run_folder(dir)) throw InputError(dir.string() + " is not a training run folder (no " + Trainer::kMetrics + ")");
  RunRecord run;
  run.dir = dir;
  if (fs::exists(dir / Trainer::kConfig)) run.config = read_json(dir / Trainer::kConfig);
  if (fs::exists(dir / Trainer::kSummary)) run.summary = read_json(dir / Trainer::kSummary);
  std::istringstream in(read_file(metrics_path));
  std::string line;
  int64_t line_no = 0;
  // Debiased exponential moving average (as TensorBoard's smoothing).
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
      run.loss.x.push_back(step), run.loss.y.push_back(l);
      ema = kSmoothing * ema + (1 - kSmoothing) * l;
      ema_weight = kSmoothing * ema_weight + (1 - kSmoothing);
      run.smooth.x.push_back(step), run.smooth.y.push_back(ema / ema_weight);
      if (std::isfinite(number(j, "lr"))) run.lr.x.push_back(step), run.lr.y.push_back(number(j, "lr"));
    } else if (type == "val") {
      const double epoch = number(j, "epoch");
      if (std::isfinite(number(j, "val_top1"))) run.val_top1.x.push_back(epoch), run.val_top1.y.push_back(100.0 * number(j, "val_top1"));
      if (std::isfinite(number(j, "val_loss"))) run.val_loss.x.push_back(epoch), run.val_loss.y.push_back(number(j, "val_loss"));
    }
  }
  return run;
}

EvalRecord read_eval(const fs::path& dir) {
  if (!is_eval_folder(dir)) throw InputError(dir.string() + " is not an evaluation folder (no " + EvalFiles::kMetrics + ")");
  EvalRecord e;
  e.dir = dir;
  const fs::path metrics_path = dir / EvalFiles::kMetrics;
  e.info = read_json(metrics_path);
  if (!e.info.is_object()) throw InputError(metrics_path.string() + ": not a JSON object");
  if (!e.info.contains("classes") && e.info.contains("retrieval")) return e;  // eval --retrieval alone
  for (const json& c : field(e.info, "classes", &json::is_array, "a list", metrics_path)) {
    if (!c.is_string()) throw InputError(metrics_path.string() + ": a class name is not a string");
    e.classes.push_back(c.get<std::string>());
  }
  e.metrics = metrics_from_json(e.info, e.classes.size(), metrics_path);

  const fs::path predictions_path = dir / EvalFiles::kPredictions;
  if (!fs::exists(predictions_path))
    throw InputError(dir.string() + " has no " + EvalFiles::kPredictions + ": evaluate again with this loratune");
  std::map<std::string, int64_t> index;
  for (size_t k = 0; k < e.classes.size(); ++k) index[e.classes[k]] = static_cast<int64_t>(k);
  std::vector<std::vector<std::string>> rows;
  for (auto& record : parse_delimited(read_file(predictions_path), ',', predictions_path.string()))
    rows.push_back(std::move(record.fields));
  const std::vector<std::string> header = {"path", "true", "predicted", "confidence"};
  if (rows.empty() || rows[0] != header)
    throw InputError(predictions_path.string() + ": the first line is not \"path,true,predicted,confidence\"");
  for (size_t r = 1; r < rows.size(); ++r) {
    const auto& row = rows[r];
    const std::string where = predictions_path.string() + " row " + std::to_string(r + 1);
    if (row.size() != header.size()) throw InputError(where + ": " + std::to_string(row.size()) + " fields, not 4");
    const auto truth = index.find(row[1]), predicted = index.find(row[2]);
    if (truth == index.end() || predicted == index.end())
      throw InputError(where + ": a class that " + EvalFiles::kMetrics + " does not list (" + printable(row[1]) + ", " +
                       printable(row[2]) + ")");
    char* end = nullptr;
    const double confidence = std::strtod(row[3].c_str(), &end);
    if (row[3].empty() || *end || !(confidence >= 0 && confidence <= 1))
      throw InputError(where + ": the confidence is not a probability");
    e.photos.push_back({row[0], truth->second, predicted->second, confidence});
  }
  if (static_cast<int64_t>(e.photos.size()) != e.metrics.count)
    throw InputError(predictions_path.string() + " has " + std::to_string(e.photos.size()) + " photos; " +
                     EvalFiles::kMetrics + " counts " + std::to_string(e.metrics.count));
  return e;
}

std::string predictions_csv(const std::vector<EvaluatedPhoto>& photos, const std::vector<std::string>& classes) {
  std::string csv = "path,true,predicted,confidence\n";
  for (const EvaluatedPhoto& p : photos) {
    char confidence[16];
    std::snprintf(confidence, sizeof confidence, "%.6f", p.confidence);
    csv += csv_field(p.path) + "," + csv_field(classes[p.truth]) + "," + csv_field(classes[p.predicted]) + "," +
           confidence + "\n";
  }
  return csv;
}

}  // namespace loratune
