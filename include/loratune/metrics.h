// Classification metrics from logits: top-1/top-5, per-class precision/recall/F1/support, confusion matrix,
// calibration (reliability bins and expected calibration error).
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

// One bin of a reliability diagram: the predictions whose top-1 probability lies in (lower, upper].
struct CalibrationBin {
  double lower = 0, upper = 0;
  int64_t count = 0;
  double confidence = 0;  // mean top-1 probability of the bin's predictions
  double accuracy = 0;    // fraction of them that are right
};

// Equal-width confidence bins of the reliability diagram and of the expected calibration error (Guo et al. 2017).
constexpr int kCalibrationBins = 15;

struct ClassificationMetrics {
  int64_t count = 0;
  double loss = 0;            // mean cross-entropy
  double top1 = 0;            // fraction
  double top5 = -1;           // fraction; -1 when there are 5 classes or fewer
  std::vector<ClassMetrics> per_class;
  double macro_precision = 0, macro_recall = 0, macro_f1 = 0;
  std::vector<std::vector<int64_t>> confusion;  // [true][predicted]
  std::vector<CalibrationBin> calibration;      // kCalibrationBins bins of the top-1 probability
  double ece = 0;  // expected calibration error: sum over bins of count/N * |accuracy - confidence|

  nlohmann::json to_json(const std::vector<std::string>& classes) const;
};

// `logits` [N,C] (any float dtype, any device), `labels` [N].
ClassificationMetrics compute_metrics(const at::Tensor& logits, const at::Tensor& labels);

// The K of the recall@K that retrieval reports.
inline const std::vector<int64_t>& retrieval_recall_ks() {
  static const std::vector<int64_t> ks = {1, 5, 10};
  return ks;
}

// One direction of retrieval: the fraction of queries whose match ranks within K (recall_ks order), and the mean of
// each query's rank (1: first).
struct RetrievalDirection {
  std::vector<double> recall;
  double mean_rank = 0;
};

// Image-text retrieval by cosine similarity: image -> text (a query's match: the best ranked of its captions) and
// text -> image (its photo). Ties rank in the query's favour.
struct RetrievalMetrics {
  int64_t images = 0, texts = 0;
  RetrievalDirection image_to_text, text_to_image;
  nlohmann::json to_json() const;
};

// `image_features` [N, D], `text_features` [M, D], `text_image`: the image of each text (every image has one or more).
RetrievalMetrics retrieval_metrics(const at::Tensor& image_features, const at::Tensor& text_features,
                                   const std::vector<int64_t>& text_image);

}  // namespace loratune
