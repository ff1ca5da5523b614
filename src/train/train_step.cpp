#include "loratune/train_step.h"

#include <ATen/ATen.h>

#include <cmath>

namespace loratune {

double backward_micro_batch(const at::Tensor& logits, const at::Tensor& labels, double share, const LossScaler& scaler,
                            double label_smoothing) {
  return backward_loss(
      at::cross_entropy_loss(logits.to(at::kFloat), labels, {}, at::Reduction::Mean, -100, label_smoothing), share,
      scaler);
}

double backward_loss(const at::Tensor& loss, double share, const LossScaler& scaler) {
  scaler.scale_loss(loss / share).backward();
  return loss.item<double>() / share;
}

at::Tensor contrastive_loss(const at::Tensor& image_features, const at::Tensor& text_features, double logit_scale) {
  auto normalized = [](const at::Tensor& x) {
    const at::Tensor f = x.to(at::kFloat);
    return f / f.pow(2).sum(-1, true).sqrt();
  };
  const at::Tensor logits = at::matmul(normalized(image_features), normalized(text_features).t()) * logit_scale;
  const at::Tensor pairs = at::arange(logits.size(0), at::TensorOptions().dtype(at::kLong).device(logits.device()));
  return (at::cross_entropy_loss(logits, pairs) + at::cross_entropy_loss(logits.t(), pairs)) / 2;
}

StepOutcome apply_step(AdamW& optimizer, LossScaler& scaler, double lr, double grad_clip, bool loss_finite) {
  const std::vector<at::Tensor> grads = optimizer.gradients();
  StepOutcome out;
  out.applied = scaler.unscale(grads) && loss_finite;
  out.grad_norm = std::nan("");
  if (out.applied) {
    out.grad_norm = clip_grad_norm(grads, grad_clip);
    optimizer.step(lr);
  }
  scaler.update(!out.applied);
  optimizer.zero_grad();
  return out;
}

void discard_gradients(const std::vector<NamedTensor>& trainable) {
  for (const auto& t : trainable)
    if (t.tensor.grad().defined()) t.tensor.mutable_grad().zero_();
}

}  // namespace loratune
