// The frozen prefix cache: outputs of the stem and the blocks without trainable tensors, per image, reused across
// epochs when augmentation is off.
#include "train/trainer_impl.h"

namespace loratune {

bool Trainer::Impl::decide_prefix_cache() const {
  const CacheMode mode = config_.data.prefix_cache;
  if (mode == CacheMode::kOff || !model_.has_frozen_prefix() || config_.data.augment.enabled) return false;
  return mode == CacheMode::kMemory || model_.blocks().frozen_prefix() > 0 || model_.method() == Method::kLinearProbe;
}

at::Tensor Trainer::Impl::prefix_for(PrefixCache& cache, const Batch& batch) {
  const bool cached = std::all_of(batch.indices.begin(), batch.indices.end(),
                                  [&](int64_t i) { return cache.rows.count(i) > 0; });
  if (cached) {
    std::vector<at::Tensor> rows;
    for (int64_t i : batch.indices) rows.push_back(cache.rows.at(i));
    return at::stack(rows).to(device_, /*non_blocking=*/true);
  }
  at::Tensor h;
  {
    AutocastScope autocast(device_, precision_);
    h = model_.prefix(batch.images.to(device_, /*non_blocking=*/true));
  }
  for (size_t k = 0; k < batch.indices.size(); ++k) cache.rows[batch.indices[k]] = h[static_cast<int64_t>(k)].to(at::kCPU).clone();
  return h;
}

at::Tensor Trainer::Impl::forward_logits(const Batch& batch, PrefixCache* cache) { return forward_images(batch, cache, true); }

at::Tensor Trainer::Impl::forward_features(const Batch& batch, PrefixCache* cache) {
  return forward_images(batch, cache, false);
}

at::Tensor Trainer::Impl::forward_images(const Batch& batch, PrefixCache* cache, bool logits) {
  const bool checkpoint = config_.gradient_checkpointing;
  if (cache) {
    const at::Tensor h = prefix_for(*cache, batch);
    AutocastScope autocast(device_, precision_);
    return logits ? model_.logits_from_prefix(h, checkpoint) : model_.features_from_prefix(h, checkpoint);
  }
  AutocastScope autocast(device_, precision_);
  const at::Tensor images = batch.images.to(device_, /*non_blocking=*/true);
  return logits ? model_.logits(images, checkpoint) : model_.features(images, checkpoint);
}

}  // namespace loratune
