// What the report reads: a training run folder (config, metrics.jsonl, summary) and an evaluation folder
// (metrics.json, predictions.csv), each checked as untrusted input (InputError naming the file and the line or key).
#pragma once

#include <filesystem>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "loratune/metrics.h"
#include "plot/plot.h"

namespace loratune {

// Files of an evaluation folder (`loratune eval --output`).
struct EvalFiles {
  static constexpr const char* kMetrics = "metrics.json";
  static constexpr const char* kPredictions = "predictions.csv";  // every photo: path, true, predicted, confidence
  static constexpr const char* kMisclassified = "misclassified.csv";
  static constexpr const char* kConfusionPng = "confusion_matrix.png";
  static constexpr const char* kReport = "report.html";
};

struct RunRecord {
  std::filesystem::path dir;
  nlohmann::json config;   // config.json; null when missing
  nlohmann::json summary;  // summary.json; null while the run has not finished
  Series loss{"train loss", {}, {}}, smooth{"moving average", {}, {}}, lr{"learning rate", {}, {}};
  Series val_top1{"validation top-1 (%)", {}, {}}, val_loss{"validation loss", {}, {}};
};

struct EvaluatedPhoto {
  std::string path;  // as evaluated (absolute)
  int64_t truth = 0, predicted = 0;
  double confidence = 0;  // probability of the predicted class
};

struct EvalRecord {
  std::filesystem::path dir;
  nlohmann::json info;  // metrics.json: model, adapter, data, ...
  std::vector<std::string> classes;
  ClassificationMetrics metrics;
  std::vector<EvaluatedPhoto> photos;
};

bool is_run_folder(const std::filesystem::path& dir);
bool is_eval_folder(const std::filesystem::path& dir);

RunRecord read_run(const std::filesystem::path& dir);
EvalRecord read_eval(const std::filesystem::path& dir);

// predictions.csv as eval writes it (CSV with quoted fields; class names, not indices).
std::string predictions_csv(const std::vector<EvaluatedPhoto>& photos, const std::vector<std::string>& classes);

}  // namespace loratune
