#include "loratune/classifier_head.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <cmath>

#include "loratune/errors.h"

namespace loratune {

void ClassifierHead::init(int64_t num_classes) {
  const double bound = 1.0 / std::sqrt(static_cast<double>(feature_dim_));
  at::NoGradGuard no_grad;
  set(at::empty({num_classes, feature_dim_}, at::kFloat).uniform_(-bound, bound),
      at::empty({num_classes}, at::kFloat).uniform_(-bound, bound));
}

void ClassifierHead::set(at::Tensor weight, at::Tensor bias) {
  if (weight.dim() != 2 || weight.size(1) != feature_dim_ || bias.dim() != 1 || bias.size(0) != weight.size(0))
    throw InputError("classification head has shape [" + c10::str(weight.sizes()) + "] + [" + c10::str(bias.sizes()) +
                     "], but the model's features have " + std::to_string(feature_dim_) + " dimensions");
  weight_ = weight.to(device_, at::kFloat).detach().requires_grad_(trainable_);
  bias_ = bias.to(device_, at::kFloat).detach().requires_grad_(trainable_);
}

void ClassifierHead::set_trainable(bool on) {
  trainable_ = on;
  if (defined()) {
    weight_.requires_grad_(on);
    bias_.requires_grad_(on);
  }
}

void ClassifierHead::to(const c10::Device& device) {
  device_ = device;
  if (defined()) set(weight_, bias_);
}

at::Tensor ClassifierHead::logits(const at::Tensor& features) const {
  if (!defined()) throw InputError("the model has no classification head");
  const at::Tensor f = normalize_features_ ? features / features.pow(2).sum(-1, true).sqrt() : features;
  return at::linear(f, weight_, bias_);
}

void ClassifierHead::append_trainable(std::vector<NamedTensor>& out) const {
  if (!defined() || !trainable_) return;
  out.push_back({"head.weight", weight_});
  out.push_back({"head.bias", bias_});
}

int64_t ClassifierHead::parameter_count() const { return defined() ? weight_.numel() + bias_.numel() : 0; }

}  // namespace loratune
