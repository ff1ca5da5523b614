// The training step, shared by the training loop, the probe step of `prepare_training` and the benchmark app:
// backward of each micro-batch (weighted by its share of the step's images, scaled for fp16), then one optimiser
// update (unscale, skip on inf/NaN, clip, AdamW, loss-scale update, zero gradients).
#pragma once

#include <ATen/Tensor.h>

#include <functional>
#include <vector>

#include "loratune/amp.h"
#include "loratune/named_tensor.h"
#include "loratune/optim.h"
#include "loratune/process_group.h"

namespace loratune {

// Backward of the mean cross-entropy of `logits` against `labels`, divided by `share` (images in the step / images in
// this micro-batch; the number of micro-batches when all are full) and scaled by `scaler`. Returns the loss / share.
double backward_micro_batch(const at::Tensor& logits, const at::Tensor& labels, double share, const LossScaler& scaler,
                            double label_smoothing = 0.0);

// Backward of `loss` divided by `share` (as above) and scaled by `scaler`. Returns loss / share.
double backward_loss(const at::Tensor& loss, double share, const LossScaler& scaler);

// CLIP's symmetric contrastive loss on paired rows: image i's positive is text i and the other texts are its
// negatives, and the same for each text; features are L2-normalised, logits = logit_scale * cosine. Computed in fp32
// (float64 stays float64). With `groups` ([N] int64), rows of one group are not each other's negatives (photos of one
// class paired with prompts of that class; one caption given to two photos).
at::Tensor contrastive_loss(const at::Tensor& image_features, const at::Tensor& text_features, double logit_scale,
                            const at::Tensor& groups = {});

// The embeddings of one micro-batch for the contrastive loss.
struct PairedFeatures {
  at::Tensor image, text;  // [n, D] each
};

// Backward of the contrastive loss over the rows of all `micro_batches` at once, at the memory of one (cached
// embeddings, as GradCache and open_clip's --accum-freq): each micro-batch is embedded without a graph, the loss and
// its gradients with respect to the embeddings are computed over all rows, then each micro-batch is embedded again
// with a graph and the embeddings' gradients flow back through it. `embed(k)` must give the same values both times:
// the random generators are set back before the second pass (dropout draws alike). The gradients are those of
// `weight` x the loss, scaled by `scaler`; `groups` as contrastive_loss, all rows in order; `device`: where embed
// runs (its generator is set back too). With `workers` (data parallel), every worker's rows join the loss (gathered;
// each worker calls this once per step, with no micro-batches too) and each worker's gradients are those of its own
// rows: summed over the workers they are the whole loss's. Returns weight x loss.
double backward_contrastive_cached(int64_t micro_batches, const std::function<PairedFeatures(int64_t k)>& embed,
                                   double logit_scale, const at::Tensor& groups, double weight,
                                   const LossScaler& scaler, const c10::Device& device,
                                   ProcessGroup* workers = nullptr);

struct StepOutcome {
  bool applied = false;      // false: inf/NaN in the gradients or the loss, the update was skipped
  double grad_norm = 0.0;    // before clipping; NaN when skipped
};

// The update after the micro-batches of a step, on the optimiser's flat gradients: unscale, clip, AdamW. `loss_finite`
// false skips it as inf/NaN gradients do.
StepOutcome apply_step(AdamW& optimizer, LossScaler& scaler, double lr, double grad_clip, bool loss_finite = true);

// Zeroes the gradients of the trainable tensors (after a probe pass).
void discard_gradients(const std::vector<NamedTensor>& trainable);

}  // namespace loratune
