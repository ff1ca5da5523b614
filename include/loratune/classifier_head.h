// The classification head on a model's features: logits = f @ W^T + b, with f L2-normalised first for a cosine head
// (zero-shot CLIP heads). Kept in fp32 on the model's device.
#pragma once

#include <ATen/Tensor.h>
#include <c10/core/Device.h>

#include <vector>

#include "loratune/named_tensor.h"

namespace loratune {

class ClassifierHead {
 public:
  explicit ClassifierHead(int64_t feature_dim) : feature_dim_(feature_dim) {}

  // nn.Linear's default initialisation for `num_classes` classes, from torch's global generator.
  void init(int64_t num_classes);
  // InputError when the shapes do not fit [classes, feature_dim] and [classes].
  void set(at::Tensor weight, at::Tensor bias);
  bool defined() const { return weight_.defined(); }
  const at::Tensor& weight() const { return weight_; }
  const at::Tensor& bias() const { return bias_; }

  void set_normalize_features(bool on) { normalize_features_ = on; }
  bool normalize_features() const { return normalize_features_; }
  // Whether it trains (not where the text tower gives it: loss contrastive).
  void set_trainable(bool on);
  bool trainable() const { return trainable_; }

  void to(const c10::Device& device);
  at::Tensor logits(const at::Tensor& features) const;
  // "head.weight" and "head.bias" when it trains.
  void append_trainable(std::vector<NamedTensor>& out) const;
  int64_t parameter_count() const;

 private:
  int64_t feature_dim_;
  at::Tensor weight_, bias_;
  bool normalize_features_ = false;
  bool trainable_ = true;
  c10::Device device_{c10::kCPU};
};

}  // namespace loratune
