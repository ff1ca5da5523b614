// Running a model over a whole batch source: logits for evaluation, validation and prediction.
#pragma once

#include <functional>
#include <string>

#include "loratune/amp.h"
#include "loratune/batch_source.h"
#include "loratune/metrics.h"

namespace loratune {

class ThreadTuner;

struct Predictions {
  at::Tensor logits;  // [N,C] float32, CPU
  at::Tensor labels;  // [N] int64, CPU
  std::vector<int64_t> indices;
};

using ForwardFn = std::function<at::Tensor(const at::Tensor& images)>;

// Runs `forward` (no gradients, autocast at `precision`) on every batch of one pass over `source`.
// With a non-empty `progress_label`, shows a progress bar; with `threads`, each batch's time goes to it (`auto`
// follows the load).
Predictions predict_all(const ForwardFn& forward, BatchSource& source, const c10::Device& device, Precision precision,
                        const std::string& progress_label = "", ThreadTuner* threads = nullptr);

// RuntimeFailure naming `what` (the adapter or model that made them) when any logits are inf or NaN: an adapter
// whose finite weights overflow (or a DoRA one with a zero row norm), or a 16-bit precision too narrow for them.
// Metrics and predictions are never made from them.
void require_finite(const Predictions& predictions, const std::string& what, Precision precision);

class Model;

// Image <-> text retrieval with `model`'s towers (its text tower set): the photos of `photos` (sample i: photo i)
// against the texts `tokens` [M, context], text j being a caption of photo text_image[j]. Photos that fail to decode
// leave with their texts. RuntimeFailure naming `what` for inf/NaN embeddings.
RetrievalMetrics evaluate_retrieval(Model& model, BatchSource& photos, const at::Tensor& tokens,
                                    const std::vector<int64_t>& text_image, const c10::Device& device,
                                    Precision precision, const std::string& what);

}  // namespace loratune
