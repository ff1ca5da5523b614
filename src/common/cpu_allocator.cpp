#include "loratune/cpu_allocator.h"

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <mutex>
#include <unordered_map>

namespace loratune {
namespace {

constexpr size_t kSmallest = 256 * 1024;  // smaller blocks go to the default allocator (glibc reuses them well)

// Size classes: 1/8 steps between powers of two.
size_t size_class(size_t n) {
  size_t power = 1;
  while (power * 2 <= n) power *= 2;
  const size_t step = power / 8;
  return (n + step - 1) / step * step;
}

class CachingCpuAllocator;
CachingCpuAllocator* instance();

class CachingCpuAllocator final : public c10::Allocator {
 public:
  // LibTorch 1.13 declares allocate() const, 2.x non-const; defining both overrides whichever exists.
  c10::DataPtr allocate(size_t n) const { return const_cast<CachingCpuAllocator*>(this)->take(n); }
  c10::DataPtr allocate(size_t n) { return take(n); }
  // mkldnn uses raw_allocate/raw_deallocate: the context is the data pointer itself.
  c10::DeleterFnPtr raw_deleter() const override { return &give_back; }
  // Pure virtual in LibTorch 2.x, absent in 1.13.
  void copy_data(void* dest, const void* src, std::size_t count) const { std::memcpy(dest, src, count); }

  void release_cached() {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& [size, ptr] : free_) c10::free_cpu(ptr);
    cached_ = 0;
    free_.clear();
  }

  CpuAllocatorStats stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {in_use_, cached_, tensor_bytes_, peak_tensor_bytes_};
  }

  void reset_peak() {
    std::lock_guard<std::mutex> lock(mutex_);
    peak_tensor_bytes_ = tensor_bytes_;
  }

 private:
  c10::DataPtr take(size_t n) {
    void* ptr = nullptr;
    const size_t size = n < kSmallest ? 0 : size_class(n);  // 0: not cached
    size_t block = size;
    if (size > 0) {
      std::lock_guard<std::mutex> lock(mutex_);
      // The smallest cached block that fits, up to twice the size: a shorter last batch or a validation batch
      // reuses the full batch's blocks instead of holding new ones beside them.
      auto it = free_.lower_bound(size);
      if (it != free_.end() && it->first <= 2 * size) {
        block = it->first;
        ptr = it->second;
        free_.erase(it);
        cached_ -= static_cast<int64_t>(block);
      }
    }
    if (!ptr) ptr = c10::alloc_cpu(size > 0 ? size : n);
    if (ptr) {
      std::lock_guard<std::mutex> lock(mutex_);
      live_.emplace(ptr, Block{block, n});
      in_use_ += static_cast<int64_t>(block);
      tensor_bytes_ += static_cast<int64_t>(n);
      peak_tensor_bytes_ = std::max(peak_tensor_bytes_, tensor_bytes_);
    }
    return c10::DataPtr(ptr, ptr, &give_back, c10::Device(c10::kCPU));
  }

  static void give_back(void* ptr);

  struct Block {
    size_t size;       // size class; 0: a small block, returned to the system when freed
    size_t requested;  // bytes the tensor asked for
  };
  std::mutex mutex_;
  std::multimap<size_t, void*> free_;       // cached blocks by size class
  std::unordered_map<void*, Block> live_;   // every block in use
  int64_t in_use_ = 0, cached_ = 0, tensor_bytes_ = 0, peak_tensor_bytes_ = 0;
};

// Never destroyed: tensors may be freed during static destruction.
CachingCpuAllocator* instance() {
  static auto* allocator = new CachingCpuAllocator();
  return allocator;
}

void CachingCpuAllocator::give_back(void* ptr) {
  if (ptr == nullptr) return;
  CachingCpuAllocator* self = instance();
  {
    std::lock_guard<std::mutex> lock(self->mutex_);
    auto it = self->live_.find(ptr);
    if (it != self->live_.end()) {
      const Block block = it->second;
      self->live_.erase(it);
      self->tensor_bytes_ -= static_cast<int64_t>(block.requested);
      if (block.size > 0) {
        self->free_.emplace(block.size, ptr);
        self->in_use_ -= static_cast<int64_t>(block.size);
        self->cached_ += static_cast<int64_t>(block.size);
        return;
      }
    }
  }
  c10::free_cpu(ptr);  // a small block (or one from before this allocator was installed)
}

}  // namespace

void install_caching_cpu_allocator() { c10::SetCPUAllocator(instance(), /*priority=*/1); }

CachingCpuAllocatorScope::CachingCpuAllocatorScope() : previous_(c10::GetCPUAllocator()) {
  install_caching_cpu_allocator();
}

// Blocks allocated meanwhile keep their deleter: freeing them later returns them to the caching allocator.
CachingCpuAllocatorScope::~CachingCpuAllocatorScope() { c10::SetCPUAllocator(previous_, /*priority=*/1); }

void release_cached_cpu_memory() { instance()->release_cached(); }

CpuAllocatorStats cpu_allocator_stats() { return instance()->stats(); }

void reset_cpu_allocator_peak() { instance()->reset_peak(); }

}  // namespace loratune
