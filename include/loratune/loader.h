// Batches of photos decoded by worker threads into a bounded queue, in a deterministic order: batch b of epoch e
// holds the same images with the same augmentation whatever the thread timing.
#pragma once

#include <atomic>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <thread>
#include <vector>

#include "loratune/batch_source.h"
#include "loratune/image_folder.h"
#include "loratune/transform.h"

namespace loratune {

// Bytes the loader's decoded-photo cache takes for `images` photos (short side resized to resize_size; square photos,
// wider ones take more), and whether the data.cache setting `cache` (auto | memory | off) keeps them: auto caches up to
// 2 GiB.
int64_t decoded_cache_bytes(size_t images, const Preprocess& preprocess);
bool caches_decoded_images(CacheMode cache, size_t images, const Preprocess& preprocess);

class ImageBatchSource : public BatchSource {
 public:
  ImageBatchSource(ImageFolder folder, Preprocess preprocess, LoaderOptions options);
  ~ImageBatchSource() override;

  int64_t num_samples() const override { return static_cast<int64_t>(folder_.samples.size()); }
  int64_t batches_per_epoch() const override;
  void start_epoch(int64_t epoch, int64_t first_batch) override;
  std::optional<Batch> next() override;
  std::vector<std::pair<std::string, std::string>> skipped() const override;
  void set_images_needed(bool needed) override;
  int64_t num_usable() const override;

  const ImageFolder& folder() const { return folder_; }
  bool caching() const { return cache_enabled_; }

 private:
  void worker_loop();
  Batch build_batch(int64_t epoch, int64_t batch_index);
  void stop_workers();

  ImageFolder folder_;
  Preprocess preprocess_;
  LoaderOptions options_;
  bool cache_enabled_ = false;
  std::vector<std::unique_ptr<std::once_flag>> cache_once_;
  std::vector<cv::Mat*> cache_;

  mutable std::mutex mutex_;
  std::condition_variable work_ready_, batch_ready_, space_ready_;
  std::vector<std::thread> workers_;
  bool shutdown_ = false;
  int64_t generation_ = 0;  // bumped by start_epoch; workers drop stale work
  int64_t epoch_ = 0, next_to_build_ = 0, next_to_return_ = 0, end_batch_ = 0;
  std::vector<int64_t> order_;
  std::map<int64_t, Batch> ready_;
  std::exception_ptr failure_;
  std::vector<std::pair<std::string, std::string>> skipped_;
  std::set<int64_t> broken_;  // samples that failed to decode
  std::atomic<bool> images_needed_{true};
};

}  // namespace loratune
