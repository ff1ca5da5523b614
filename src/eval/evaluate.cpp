#include "loratune/evaluate.h"

#include <ATen/core/grad_mode.h>
#include <ATen/ATen.h>

#include <chrono>

#include "loratune/errors.h"
#include "loratune/memory.h"
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

}  // namespace loratune
