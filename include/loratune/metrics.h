// Classification metrics from logits: top-1/top-5, per-class precision/recall/F1/support, confusion matrix.
#pragma once

#include <ATen/Tensor.h>

#include <nlohmann/json.hpp>

#include <string>
#include <vector>

namespace loratune {

struct ClassMetrics {
  double precision = 0, recall = 0, f1 = 0;
  int64_t support = 0;
};

struct ClassificationMetrics {
  int64_t count = 0;
  double loss = 0;            // mean cross-entropy
  double top1 = 0;            // fraction
  double top5 = -1;           // fraction; -1 when there are 5 classes or fewer
  std::vector<ClassMetrics> per_class;
  double macro_precision = 0, macro_recall = 0, macro_f1 = 0;
  std::vector<std::vector<int64_t>> confusion;  // [true][predicted]

  nlohmann::json to_json(const std::vector<std::string>& classes) const;
};

// `logits` [N,C] (any float dtype, any device), `labels` [N].
ClassificationMetrics compute_metrics(const at::Tensor& logits, const at::Tensor& labels);

}  // namespace loratune
