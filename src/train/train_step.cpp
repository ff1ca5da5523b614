#include "loratune/train_step.h"

#include <ATen/ATen.h>

#include <ATen/core/grad_mode.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <utility>

#include "common/torch_compat.h"

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

at::Tensor contrastive_loss(const at::Tensor& image_features, const at::Tensor& text_features, double logit_scale,
                            const at::Tensor& groups) {
  auto normalized = [](const at::Tensor& x) {
    const at::Tensor f = x.scalar_type() == at::kDouble ? x : x.to(at::kFloat);
    return f / f.pow(2).sum(-1, true).sqrt();
  };
  at::Tensor logits = at::matmul(normalized(image_features), normalized(text_features).t()) * logit_scale;
  const at::Tensor pairs = at::arange(logits.size(0), at::TensorOptions().dtype(at::kLong).device(logits.device()));
  if (groups.defined()) {
    const at::Tensor g = groups.to(logits.device());
    const at::Tensor same_group_elsewhere = g.unsqueeze(1).eq(g.unsqueeze(0)).logical_and(
        at::eye(logits.size(0), at::TensorOptions().dtype(at::kBool).device(logits.device())).logical_not());
    logits = logits.masked_fill(same_group_elsewhere, -std::numeric_limits<double>::infinity());
  }
  return (at::cross_entropy_loss(logits, pairs) + at::cross_entropy_loss(logits.t(), pairs)) / 2;
}

double backward_contrastive_cached(int64_t micro_batches, const std::function<PairedFeatures(int64_t k)>& embed,
                                   double logit_scale, const at::Tensor& groups, double weight,
                                   const LossScaler& scaler, const c10::Device& device, ProcessGroup* workers) {
  // The random state both passes start from, so that dropout draws the same masks in each.
  std::vector<std::pair<at::Generator, at::Tensor>> random_states;
  for (const c10::Device& d : {c10::Device(c10::kCPU), device}) {
    if (!random_states.empty() && d.is_cpu()) continue;
    at::Generator generator = compat::default_generator(d);
    random_states.emplace_back(generator, generator.get_state());
  }

  const auto at_least_fp32 = [](const at::Tensor& t) {
    return t.scalar_type() == at::kDouble ? t : t.to(at::kFloat);
  };
  std::vector<at::Tensor> images, texts;
  {
    at::NoGradGuard no_grad;
    for (int64_t k = 0; k < micro_batches; ++k) {
      const PairedFeatures f = embed(k);
      images.push_back(at_least_fp32(f.image.detach()));
      texts.push_back(at_least_fp32(f.text.detach()));
    }
  }
  at::Tensor all_images = images.empty() ? at::empty({0, 0}) : at::cat(images);
  at::Tensor all_texts = texts.empty() ? at::empty({0, 0}) : at::cat(texts);
  at::Tensor all_groups = groups.defined() ? groups : at::Tensor();
  int64_t first_row = 0;  // where this worker's rows begin among all
  if (workers) {
    const c10::Device where = all_images.device();
    std::tie(all_images, first_row) = workers->gather_rows(all_images.cpu());
    all_texts = workers->gather_rows(all_texts.cpu()).first;
    if (all_groups.defined())
      all_groups = workers->gather_rows(all_groups.to(at::kDouble).unsqueeze(1)).first.squeeze(1).round().to(at::kLong);
    all_images = all_images.to(where);
    all_texts = all_texts.to(where);
  }
  if (all_images.size(0) == 0) return 0.0;
  all_images.requires_grad_();
  all_texts.requires_grad_();
  const at::Tensor loss = contrastive_loss(all_images, all_texts, logit_scale, all_groups);
  loss.backward();
  const double value = loss.item<double>() * weight;

  for (auto& [generator, state] : random_states) generator.set_state(state);
  int64_t row = first_row;
  for (int64_t k = 0; k < micro_batches; ++k) {
    const PairedFeatures f = embed(k);
    const int64_t n = f.image.size(0);
    const at::Tensor surrogate = (at_least_fp32(f.image) * all_images.grad().narrow(0, row, n)).sum() +
                                 (at_least_fp32(f.text) * all_texts.grad().narrow(0, row, n)).sum();
    scaler.scale_loss(surrogate * weight).backward();
    row += n;
  }
  return value;
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
