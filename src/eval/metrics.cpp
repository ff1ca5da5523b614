#include "loratune/metrics.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "loratune/errors.h"

namespace loratune {

ClassificationMetrics compute_metrics(const at::Tensor& logits_in, const at::Tensor& labels_in) {
  const at::Tensor logits = logits_in.detach().to(at::kCPU, at::kDouble);
  const at::Tensor labels = labels_in.detach().to(at::kCPU, at::kLong);
  if (logits.dim() != 2 || labels.dim() != 1 || logits.size(0) != labels.size(0))
    throw InputError("metrics need logits [N,C] and labels [N]");
  ClassificationMetrics m;
  const int64_t n = logits.size(0), c = logits.size(1);
  m.count = n;
  m.per_class.assign(static_cast<size_t>(c), {});
  m.confusion.assign(static_cast<size_t>(c), std::vector<int64_t>(static_cast<size_t>(c), 0));
  if (n == 0) return m;
  m.loss = at::cross_entropy_loss(logits, labels).item<double>();
  const at::Tensor predicted = logits.argmax(1);
  const auto pred = predicted.accessor<int64_t, 1>();
  const auto truth = labels.accessor<int64_t, 1>();
  int64_t correct = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (truth[i] < 0 || truth[i] >= c) throw InputError("label " + std::to_string(truth[i]) + " out of range");
    ++m.confusion[truth[i]][pred[i]];
    correct += truth[i] == pred[i];
  }
  m.top1 = static_cast<double>(correct) / n;
  if (c > 5) {
    const at::Tensor top5 = std::get<1>(logits.topk(5, 1));
    m.top5 = top5.eq(labels.unsqueeze(1)).any(1).to(at::kDouble).mean().item<double>();
  }
  m.calibration.resize(kCalibrationBins);
  for (int b = 0; b < kCalibrationBins; ++b)
    m.calibration[b].lower = static_cast<double>(b) / kCalibrationBins,
    m.calibration[b].upper = static_cast<double>(b + 1) / kCalibrationBins;
  const at::Tensor top_probability = std::get<0>(logits.softmax(1).max(1));
  const auto confidence = top_probability.accessor<double, 1>();
  for (int64_t i = 0; i < n; ++i) {
    const int b = std::clamp(static_cast<int>(std::ceil(confidence[i] * kCalibrationBins)) - 1, 0, kCalibrationBins - 1);
    CalibrationBin& bin = m.calibration[b];
    ++bin.count, bin.confidence += confidence[i], bin.accuracy += truth[i] == pred[i];
  }
  for (CalibrationBin& bin : m.calibration) {
    if (bin.count == 0) continue;
    bin.confidence /= bin.count, bin.accuracy /= bin.count;
    m.ece += static_cast<double>(bin.count) / n * std::abs(bin.accuracy - bin.confidence);
  }
  for (int64_t k = 0; k < c; ++k) {
    int64_t tp = m.confusion[k][k], predicted_k = 0, actual_k = 0;
    for (int64_t j = 0; j < c; ++j) predicted_k += m.confusion[j][k], actual_k += m.confusion[k][j];
    ClassMetrics& cm = m.per_class[k];
    cm.support = actual_k;
    cm.precision = predicted_k ? static_cast<double>(tp) / predicted_k : 0.0;
    cm.recall = actual_k ? static_cast<double>(tp) / actual_k : 0.0;
    cm.f1 = cm.precision + cm.recall > 0 ? 2 * cm.precision * cm.recall / (cm.precision + cm.recall) : 0.0;
  }
  // Macro averages over the classes that have examples (as scikit-learn does with labels present).
  int64_t present = 0;
  for (const auto& cm : m.per_class)
    if (cm.support > 0) ++present, m.macro_precision += cm.precision, m.macro_recall += cm.recall, m.macro_f1 += cm.f1;
  if (present) m.macro_precision /= present, m.macro_recall /= present, m.macro_f1 /= present;
  return m;
}

nlohmann::json ClassificationMetrics::to_json(const std::vector<std::string>& classes) const {
  nlohmann::json per = nlohmann::json::array();
  for (size_t k = 0; k < per_class.size(); ++k)
    per.push_back({{"class", k < classes.size() ? classes[k] : std::to_string(k)},
                   {"precision", per_class[k].precision},
                   {"recall", per_class[k].recall},
                   {"f1", per_class[k].f1},
                   {"support", per_class[k].support}});
  nlohmann::json j = {{"count", count},
                      {"loss", loss},
                      {"top1", top1},
                      {"per_class", per},
                      {"macro_precision", macro_precision},
                      {"macro_recall", macro_recall},
                      {"macro_f1", macro_f1},
                      {"confusion_matrix", confusion},
                      {"classes", classes}};
  if (top5 >= 0) j["top5"] = top5;
  nlohmann::json bins = nlohmann::json::array();
  for (const CalibrationBin& b : calibration)
    bins.push_back({{"lower", b.lower}, {"upper", b.upper}, {"count", b.count}, {"confidence", b.confidence},
                    {"accuracy", b.accuracy}});
  j["calibration"] = bins;
  j["ece"] = ece;
  return j;
}

namespace {

// Recall@K and mean rank of 1-based ranks [Q] int64.
RetrievalDirection direction_of(const at::Tensor& ranks) {
  RetrievalDirection d;
  for (const int64_t k : retrieval_recall_ks()) d.recall.push_back(ranks.le(k).to(at::kDouble).mean().item<double>());
  d.mean_rank = ranks.to(at::kDouble).mean().item<double>();
  return d;
}

nlohmann::json direction_json(const RetrievalDirection& d) {
  nlohmann::json j = {{"mean_rank", d.mean_rank}};
  for (size_t i = 0; i < d.recall.size(); ++i) j["recall@" + std::to_string(retrieval_recall_ks()[i])] = d.recall[i];
  return j;
}

}  // namespace

nlohmann::json RetrievalMetrics::to_json() const {
  return {{"images", images},
          {"texts", texts},
          {"image_to_text", direction_json(image_to_text)},
          {"text_to_image", direction_json(text_to_image)}};
}

RetrievalMetrics retrieval_metrics(const at::Tensor& image_features, const at::Tensor& text_features,
                                   const std::vector<int64_t>& text_image) {
  const auto normalized = [](const at::Tensor& x) {
    const at::Tensor f = x.to(at::kCPU, at::kDouble);
    return f / f.norm(2, {1}, true);
  };
  const at::Tensor similarity = at::matmul(normalized(image_features), normalized(text_features).t());  // [N, M]
  const int64_t n = similarity.size(0), m = similarity.size(1);
  const at::Tensor owner = at::tensor(text_image, at::kLong);
  const at::Tensor own = at::zeros({n, m}, at::kBool).index_put_({owner, at::arange(m)}, true);
  // Image -> text: texts scoring above the image's best caption; text -> image: images above its own.
  const at::Tensor best_caption =
      similarity.masked_fill(own.logical_not(), -std::numeric_limits<double>::infinity()).amax(1, true);
  const at::Tensor image_ranks = similarity.gt(best_caption).sum(1) + 1;
  const at::Tensor own_image = similarity.gather(0, owner.unsqueeze(0));  // [1, M]
  const at::Tensor text_ranks = similarity.gt(own_image).sum(0) + 1;
  RetrievalMetrics r;
  r.images = n;
  r.texts = m;
  r.image_to_text = direction_of(image_ranks);
  r.text_to_image = direction_of(text_ranks);
  return r;
}

}  // namespace loratune
