// What the training loop reads: batches whose content depends only on (seed, epoch, position), never on timing or
// thread count, so that an interrupted and resumed run sees exactly the same data.
#pragma once

#include <ATen/Tensor.h>

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "loratune/named_enum.h"

namespace loratune {

// Training augmentation: random resized crop and horizontal flip.
struct AugmentConfig {
  bool enabled = true;
  double scale_min = 0.35, scale_max = 1.0;  // random resized crop: area fraction
  double ratio_min = 0.75, ratio_max = 4.0 / 3.0;
  bool hflip = true;
};

// Images with more pixels than this are skipped before decoding (a 20000x20000 PNG would take 1.2 GB decoded).
inline constexpr int64_t kDefaultMaxImagePixels = 100'000'000;

// Whether decoded photos (data.cache) or the frozen prefix's outputs (data.prefix_cache) are kept in memory.
enum class CacheMode { kAuto, kMemory, kOff };
template <>
struct NamedEnum<CacheMode> {
  static constexpr std::pair<CacheMode, const char*> names[] = {
      {CacheMode::kAuto, "auto"}, {CacheMode::kMemory, "memory"}, {CacheMode::kOff, "off"}};
};

// How photo folders are read into batches (ImageBatchSource in loader.h).
struct LoaderOptions {
  int64_t batch_size = 16;
  bool shuffle = false;
  bool drop_last = false;
  bool augment = false;       // training transform (else eval transform)
  AugmentConfig augmentation;
  uint64_t seed = 0;
  int workers = 0;            // 0: one per core
  int prefetch_batches = 4;
  CacheMode cache = CacheMode::kOff;
  bool pin_memory = false;    // page-locked batches for faster copies to CUDA
  int64_t max_image_pixels = kDefaultMaxImagePixels;  // larger images are skipped and listed (0: no limit)
  // Data-parallel workers: each batch keeps only part `shard_index` of `shard_count` contiguous parts, so the
  // workers together see every batch of the single-process run, in its order.
  int shard_index = 0, shard_count = 1;
};

struct Batch {
  at::Tensor images;  // [N,3,H,W] float32, normalised
  at::Tensor labels;  // [N] int64
  std::vector<int64_t> indices;  // sample indices in the source
};

class BatchSource {
 public:
  virtual ~BatchSource() = default;
  virtual int64_t num_samples() const = 0;
  virtual int64_t batches_per_epoch() const = 0;
  // Begins `epoch` at batch `first_batch` (a resumed run skips what it has seen).
  virtual void start_epoch(int64_t epoch, int64_t first_batch) = 0;
  // The next batch of the epoch, or nothing at its end.
  virtual std::optional<Batch> next() = 0;
  // Files that could not be used so far: path and reason.
  virtual std::vector<std::pair<std::string, std::string>> skipped() const { return {}; }
  // Samples that can be used (those that failed to decode excluded, as far as known).
  virtual int64_t num_usable() const { return num_samples(); }
  // With false, batches carry indices and labels only (the images are cached elsewhere); decoding stops.
  virtual void set_images_needed(bool needed) {}
};

// Deterministic random numbers (SplitMix64): the same on every platform and standard library.
class Rng {
 public:
  explicit Rng(uint64_t seed) : state_(seed) {}
  // Generator for one item of one epoch, independent of every other.
  static Rng for_item(uint64_t seed, int64_t epoch, int64_t index);
  uint64_t next();
  double uniform();               // [0, 1)
  double uniform(double lo, double hi);
  int64_t below(int64_t n);       // [0, n)

 private:
  uint64_t state_;
};

// The order of `n` samples in `epoch`: a Fisher-Yates shuffle seeded by (seed, epoch).
std::vector<int64_t> epoch_order(int64_t n, uint64_t seed, int64_t epoch);

// Batches from tensors held in memory (tests, synthetic data).
class TensorBatchSource : public BatchSource {
 public:
  TensorBatchSource(at::Tensor images, at::Tensor labels, int64_t batch_size, bool shuffle, bool drop_last, uint64_t seed);
  int64_t num_samples() const override { return images_.size(0); }
  int64_t batches_per_epoch() const override;
  void start_epoch(int64_t epoch, int64_t first_batch) override;
  std::optional<Batch> next() override;

 private:
  at::Tensor images_, labels_;
  int64_t batch_size_;
  bool shuffle_, drop_last_;
  uint64_t seed_;
  std::vector<int64_t> order_;
  int64_t next_batch_ = 0;
};

}  // namespace loratune
