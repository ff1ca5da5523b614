#include "loratune/evaluate.h"

#include <ATen/core/grad_mode.h>
#include <ATen/ATen.h>

#include <chrono>
#include <map>

#include "loratune/errors.h"
#include "loratune/memory.h"
#include "loratune/model.h"
#include "loratune/threads.h"
#include "common/progress.h"

namespace loratune {

Predictions predict_all(const ForwardFn& forward, BatchSource& source, const c10::Device& device, Precision precision,
                        const std::string& progress_label, ThreadTuner* threads) {
  at::NoGradGuard no_grad;
  std::vector<at::Tensor> logits, labels;
  Predictions out;
  std::unique_ptr<ProgressBar> bar;
  if (!progress_label.empty()) bar = std::make_unique<ProgressBar>(progress_label, source.num_samples(), "img");
  int64_t done = 0;
  source.start_epoch(0, 0);
  while (auto batch = source.next()) {
    const auto start = std::chrono::steady_clock::now();
    at::Tensor y;
    {
      AutocastScope autocast(device, precision);
      y = forward(batch->images.to(device, /*non_blocking=*/true));
    }
    logits.push_back(y.to(at::kCPU, at::kFloat));
    if (threads)
      threads->record(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), batch->images.size(0));
    labels.push_back(batch->labels.to(at::kCPU));
    out.indices.insert(out.indices.end(), batch->indices.begin(), batch->indices.end());
    done += batch->images.size(0);
    if (bar) bar->update(done, memory_status(device));
  }
  if (bar) bar->finish(memory_status(device));
  out.logits = logits.empty() ? at::empty({0, 0}) : at::cat(logits);
  out.labels = labels.empty() ? at::empty({0}, at::kLong) : at::cat(labels);
  return out;
}

void require_finite(const Predictions& predictions, const std::string& what, Precision precision) {
  if (predictions.logits.numel() == 0) return;
  const int64_t bad = (~at::isfinite(predictions.logits)).any(1).sum().item<int64_t>();
  if (bad == 0) return;
  throw RuntimeFailure(what + " gives inf/NaN outputs for " + std::to_string(bad) + " of " +
                       std::to_string(predictions.logits.size(0)) + " images at " + precision_name(precision) +
                       (precision == Precision::kFp32 ? ": its weights overflow (damaged, or a diverged training run); "
                                                        "use another adapter or retrain it"
                                                      : ": try --precision fp32; if that fails too, its weights overflow"));
}

RetrievalMetrics evaluate_retrieval(Model& model, BatchSource& photos, const at::Tensor& tokens,
                                    const std::vector<int64_t>& text_image, const c10::Device& device,
                                    Precision precision, const std::string& what) {
  model.set_training(false);
  Predictions images = predict_all([&](const at::Tensor& x) { return model.features(x); }, photos, device, precision,
                                   "photos");
  require_finite(images, what, precision);
  std::map<int64_t, int64_t> row_of;  // photo -> its row among those decoded
  for (size_t r = 0; r < images.indices.size(); ++r) row_of[images.indices[r]] = static_cast<int64_t>(r);
  std::vector<int64_t> kept, owner;
  for (size_t j = 0; j < text_image.size(); ++j)
    if (const auto it = row_of.find(text_image[j]); it != row_of.end()) {
      kept.push_back(static_cast<int64_t>(j));
      owner.push_back(it->second);
    }
  if (kept.empty()) throw InputError("no photo of the caption file could be decoded");
  TensorBatchSource texts(tokens.index_select(0, at::tensor(kept, at::kLong)), at::zeros({static_cast<int64_t>(kept.size())}, at::kLong),
                          64, false, false, 0);
  Predictions text = predict_all([&](const at::Tensor& t) { return model.text_features(t); }, texts, device, precision,
                                 "captions");
  require_finite(text, what, precision);
  return retrieval_metrics(images.logits, text.logits, owner);
}

}  // namespace loratune
