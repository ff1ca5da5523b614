#include "loratune/batch_source.h"

#include <ATen/ATen.h>

#include <numeric>

namespace loratune {

uint64_t Rng::next() {
  uint64_t z = (state_ += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

Rng Rng::for_item(uint64_t seed, int64_t epoch, int64_t index) {
  Rng mix(seed);
  mix.state_ ^= Rng(static_cast<uint64_t>(epoch) * 0x632be59bd9b4e019ULL).next();
  mix.state_ ^= Rng(static_cast<uint64_t>(index) + 0x8cb92ba72f3d8dd7ULL).next();
  return Rng(mix.next());
}

double Rng::uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }
double Rng::uniform(double lo, double hi) { return lo + (hi - lo) * uniform(); }

int64_t Rng::below(int64_t n) {
  // Lemire's multiply-shift reduction, with rejection for exact uniformity.
  const auto range = static_cast<uint64_t>(n);
  unsigned __int128 m = static_cast<unsigned __int128>(next()) * range;
  auto low = static_cast<uint64_t>(m);
  if (low < range) {
    const uint64_t threshold = (0 - range) % range;
    while (low < threshold) {
      m = static_cast<unsigned __int128>(next()) * range;
      low = static_cast<uint64_t>(m);
    }
  }
  return static_cast<int64_t>(m >> 64);
}

std::vector<int64_t> epoch_order(int64_t n, uint64_t seed, int64_t epoch) {
  std::vector<int64_t> order(static_cast<size_t>(n));
  std::iota(order.begin(), order.end(), 0);
  Rng rng = Rng::for_item(seed, epoch, -1);
  for (int64_t i = n - 1; i > 0; --i) std::swap(order[i], order[rng.below(i + 1)]);
  return order;
}

TensorBatchSource::TensorBatchSource(at::Tensor images, at::Tensor labels, int64_t batch_size, bool shuffle,
                                     bool drop_last, uint64_t seed)
    : images_(std::move(images)), labels_(std::move(labels)), batch_size_(batch_size), shuffle_(shuffle),
      drop_last_(drop_last), seed_(seed) {}

int64_t TensorBatchSource::batches_per_epoch() const {
  const int64_t n = num_samples();
  return drop_last_ ? n / batch_size_ : (n + batch_size_ - 1) / batch_size_;
}

void TensorBatchSource::start_epoch(int64_t epoch, int64_t first_batch) {
  if (shuffle_) {
    order_ = epoch_order(num_samples(), seed_, epoch);
  } else {
    order_.resize(static_cast<size_t>(num_samples()));
    std::iota(order_.begin(), order_.end(), 0);
  }
  next_batch_ = first_batch;
}

std::optional<Batch> TensorBatchSource::next() {
  if (next_batch_ >= batches_per_epoch()) return std::nullopt;
  const int64_t begin = next_batch_ * batch_size_;
  const int64_t end = std::min<int64_t>(begin + batch_size_, num_samples());
  ++next_batch_;
  Batch b;
  b.indices.assign(order_.begin() + begin, order_.begin() + end);
  const at::Tensor idx = at::tensor(b.indices, at::kLong);
  b.images = images_.index_select(0, idx);
  b.labels = labels_.index_select(0, idx);
  return b;
}

}  // namespace loratune
