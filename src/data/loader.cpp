#include "loratune/loader.h"

#include <opencv2/core.hpp>

#include <ATen/ATen.h>
#include <spdlog/spdlog.h>

#include <numeric>

#include "loratune/errors.h"
#include "loratune/image.h"
#include "common/strings.h"

namespace loratune {
namespace {

constexpr double kAutoCacheBytes = 2.0 * 1024 * 1024 * 1024;
constexpr int kMaxWorkersPerCore = 4;
constexpr int kMaxWorkers = 256;

}  // namespace

int64_t decoded_cache_bytes(size_t images, const Preprocess& preprocess) {
  return static_cast<int64_t>(images) * preprocess.resize_size * preprocess.resize_size * 3;
}

bool caches_decoded_images(CacheMode cache, size_t images, const Preprocess& preprocess) {
  // auto decides on 1.4x the square size: photos are rarely square.
  const double estimate = 1.4 * static_cast<double>(decoded_cache_bytes(images, preprocess));
  return cache == CacheMode::kMemory || (cache == CacheMode::kAuto && estimate <= kAutoCacheBytes);
}

ImageBatchSource::ImageBatchSource(ImageFolder folder, Preprocess preprocess, LoaderOptions options)
    : folder_(std::move(folder)), preprocess_(preprocess), options_(std::move(options)) {
  if (options_.batch_size < 1) throw InputError("batch size must be >= 1");
  cache_enabled_ = caches_decoded_images(options_.cache, folder_.samples.size(), preprocess_);
  if (cache_enabled_) {
    cache_.assign(folder_.samples.size(), nullptr);
    for (size_t i = 0; i < folder_.samples.size(); ++i) cache_once_.push_back(std::make_unique<std::once_flag>());
  }
  cv::setNumThreads(1);  // parallelism comes from the workers
  // More decoders than a few per core only cost memory (each holds a decoded photo).
  const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  const int asked = options_.workers > 0 ? options_.workers : cores;
  const int n = std::min(asked, std::min(kMaxWorkersPerCore * cores, kMaxWorkers));
  if (n < asked) spdlog::warn("{} decoding workers asked for; using {} ({} CPU cores)", asked, n, cores);
  try {
    for (int i = 0; i < n; ++i) workers_.emplace_back([this] { worker_loop(); });
  } catch (const std::system_error& e) {
    if (workers_.empty()) {
      stop_workers();
      throw RuntimeFailure(std::string("cannot start a decoding thread (") + e.what() + "); the process limit is too low");
    }
    spdlog::warn("started {} of {} decoding workers ({}); going on with those", workers_.size(), n, e.what());
  }
}

ImageBatchSource::~ImageBatchSource() {
  stop_workers();
  for (cv::Mat* m : cache_) delete m;
}

void ImageBatchSource::stop_workers() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    shutdown_ = true;
  }
  work_ready_.notify_all();
  space_ready_.notify_all();
  for (auto& t : workers_)
    if (t.joinable()) t.join();
  workers_.clear();
}

int64_t ImageBatchSource::batches_per_epoch() const {
  const int64_t n = num_samples(), b = options_.batch_size;
  return options_.drop_last ? n / b : (n + b - 1) / b;
}

void ImageBatchSource::start_epoch(int64_t epoch, int64_t first_batch) {
  std::vector<int64_t> order;
  if (options_.shuffle) {
    order = epoch_order(num_samples(), options_.seed, epoch);
  } else {
    order.resize(static_cast<size_t>(num_samples()));
    std::iota(order.begin(), order.end(), 0);
  }
  {
    std::lock_guard<std::mutex> lock(mutex_);
    ++generation_;
    epoch_ = epoch;
    order_ = std::move(order);
    next_to_build_ = next_to_return_ = first_batch;
    end_batch_ = batches_per_epoch();
    ready_.clear();
    failure_ = nullptr;
  }
  work_ready_.notify_all();
  space_ready_.notify_all();
}

void ImageBatchSource::worker_loop() {
  std::unique_lock<std::mutex> lock(mutex_);
  while (true) {
    // Wait for a batch to build that fits in the prefetch window.
    work_ready_.wait(lock, [&] { return shutdown_ || next_to_build_ < end_batch_; });
    if (shutdown_) return;
    space_ready_.wait(lock, [&] {
      return shutdown_ || next_to_build_ >= end_batch_ || next_to_build_ < next_to_return_ + options_.prefetch_batches;
    });
    if (shutdown_) return;
    if (next_to_build_ >= end_batch_) continue;
    const int64_t index = next_to_build_++, generation = generation_, epoch = epoch_;
    lock.unlock();
    Batch batch;
    std::exception_ptr error;
    try {
      batch = build_batch(epoch, index);
    } catch (...) {
      error = std::current_exception();
    }
    lock.lock();
    if (generation != generation_) continue;  // the epoch was restarted meanwhile
    if (error) failure_ = error;
    else ready_.emplace(index, std::move(batch));
    batch_ready_.notify_all();
  }
}

Batch ImageBatchSource::build_batch(int64_t epoch, int64_t batch_index) {
  std::vector<int64_t> indices;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    const int64_t begin = batch_index * options_.batch_size;
    const int64_t end = std::min<int64_t>(begin + options_.batch_size, num_samples());
    const int64_t n = end - begin, k = options_.shard_index, parts = options_.shard_count;
    indices.assign(order_.begin() + begin + n * k / parts, order_.begin() + begin + n * (k + 1) / parts);
  }
  const int64_t s = preprocess_.image_size;
  std::vector<cv::Mat> images;
  std::vector<int64_t> kept, labels;
  if (!images_needed_) {
    Batch b;
    std::lock_guard<std::mutex> lock(mutex_);
    for (int64_t idx : indices)
      if (!broken_.count(idx)) b.indices.push_back(idx), labels.push_back(folder_.samples[static_cast<size_t>(idx)].label);
    b.labels = at::tensor(labels, at::kLong);
    return b;
  }
  for (int64_t idx : indices) {
    const ImageSample& sample = folder_.samples[static_cast<size_t>(idx)];
    cv::Mat rgb;
    std::string error;
    if (cache_enabled_) {
      std::call_once(*cache_once_[idx], [&] {
        if (auto decoded = decode_image(sample.path, error, options_.max_image_pixels))
          cache_[idx] = new cv::Mat(resize_short_side(*decoded, preprocess_.resize_size, preprocess_.interpolation).clone());
      });
      if (cache_[idx]) rgb = *cache_[idx];
      else if (error.empty()) error = "cannot decode";
    } else if (auto decoded = decode_image(sample.path, error, options_.max_image_pixels)) {
      rgb = *decoded;
    }
    if (rgb.empty()) {
      std::lock_guard<std::mutex> lock(mutex_);
      broken_.insert(idx);
      if (std::none_of(skipped_.begin(), skipped_.end(), [&](const auto& s) { return s.first == sample.path.string(); })) {
        skipped_.push_back({sample.path.string(), error});
        spdlog::warn("skipping {}: {}", sample.path.string(), error);
      }
      continue;
    }
    Rng rng = Rng::for_item(options_.seed, epoch, idx);
    images.push_back(options_.augment ? train_transform(rgb, preprocess_, options_.augmentation, rng)
                                      : eval_transform(rgb, preprocess_));
    kept.push_back(idx);
    labels.push_back(sample.label);
  }
  Batch b;
  const auto n = static_cast<int64_t>(images.size());
  b.images = at::empty({n, 3, s, s}, at::TensorOptions().dtype(at::kFloat).pinned_memory(options_.pin_memory));
  for (int64_t i = 0; i < n; ++i) to_normalized_chw(images[i], preprocess_, b.images[i]);
  b.labels = at::tensor(labels, at::kLong);
  b.indices = std::move(kept);
  return b;
}

std::optional<Batch> ImageBatchSource::next() {
  std::unique_lock<std::mutex> lock(mutex_);
  if (next_to_return_ >= end_batch_) return std::nullopt;
  batch_ready_.wait(lock, [&] { return failure_ || ready_.count(next_to_return_); });
  if (failure_) std::rethrow_exception(failure_);
  auto it = ready_.find(next_to_return_);
  Batch b = std::move(it->second);
  ready_.erase(it);
  ++next_to_return_;
  lock.unlock();
  space_ready_.notify_all();
  return b;
}

void ImageBatchSource::set_images_needed(bool needed) { images_needed_ = needed; }

int64_t ImageBatchSource::num_usable() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return num_samples() - static_cast<int64_t>(broken_.size());
}

std::vector<std::pair<std::string, std::string>> ImageBatchSource::skipped() const {
  std::lock_guard<std::mutex> lock(mutex_);
  auto all = folder_.skipped;
  all.insert(all.end(), skipped_.begin(), skipped_.end());
  return all;
}

}  // namespace loratune
