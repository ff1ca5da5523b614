// A caching allocator for CPU tensors, as CUDA has one: freed blocks of 256 KB and more are kept by size class and
// reused for requests of the same size down to half of it. glibc returns large freed blocks to the system and maps
// them again on the next step, which costs a page fault per 4 KB (training steps ran ~30% slower than in Python) and
// leaves the resident set far above the memory actually live. Installed by the applications at start-up; library
// users may install it too.
#pragma once

#include <cstdint>

namespace c10 {
struct Allocator;
}

namespace loratune {

// Makes the caching allocator LibTorch's CPU allocator (idempotent).
void install_caching_cpu_allocator();

// The caching allocator for as long as the object lives; LibTorch's CPU allocator before comes back at the end
// (probe_memory counts tensor bytes there without changing the caller's allocator).
class CachingCpuAllocatorScope {
 public:
  CachingCpuAllocatorScope();
  ~CachingCpuAllocatorScope();
  CachingCpuAllocatorScope(const CachingCpuAllocatorScope&) = delete;
  CachingCpuAllocatorScope& operator=(const CachingCpuAllocatorScope&) = delete;

 private:
  c10::Allocator* previous_;
};

// Frees every cached block that is not in use (e.g. after training, before a long evaluation).
void release_cached_cpu_memory();

struct CpuAllocatorStats {
  int64_t in_use = 0;             // bytes of live cached-size blocks (sizes rounded up to their class)
  int64_t cached = 0;             // bytes of free blocks kept for reuse
  int64_t tensor_bytes = 0;       // bytes requested by all live allocations, small ones too
  int64_t peak_tensor_bytes = 0;  // high-water mark of tensor_bytes since start or the last reset
};
CpuAllocatorStats cpu_allocator_stats();

// Starts a new high-water mark of tensor bytes from what is live now.
void reset_cpu_allocator_peak();

}  // namespace loratune
