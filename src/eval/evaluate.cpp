#include "loratune/evaluate.h"

#include <ATen/core/grad_mode.h>
#include <ATen/ATen.h>

#include <chrono>

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

}  // namespace loratune
