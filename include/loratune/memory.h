// Memory readings for progress bars, summaries and benchmarks.
#pragma once

#include <c10/core/Device.h>

#include <cstdint>
#include <exception>
#include <string>

namespace loratune {

struct MemoryReading {
  int64_t rss = 0;             // resident set size of this process, bytes
  int64_t peak_rss = 0;        // high-water mark of the resident set since start or the last reset
  int64_t device_allocated = -1;       // CUDA allocator: bytes in use (-1 on CPU)
  int64_t device_peak_allocated = -1;  // CUDA allocator: high-water mark
};

MemoryReading read_memory(const c10::Device& device);

// Resets the RSS high-water mark (Linux) and the CUDA allocator's peak statistics.
void reset_peak_memory(const c10::Device& device);

// Short text for progress bars: "mem 1.23 GB" (CUDA: allocated / peak).
std::string memory_status(const c10::Device& device);

// Bytes held by tensors on `device` now and at most since the last reset_peak_memory: the CUDA allocator's
// allocated bytes, or on the CPU the caching allocator's requested bytes (install_caching_cpu_allocator first).
struct TensorBytes {
  int64_t current = 0;
  int64_t peak = 0;
};
TensorBytes tensor_bytes(const c10::Device& device);

// Peak memory that matters for the device: CUDA peak allocated, or peak RSS on CPU.
int64_t peak_memory(const c10::Device& device);

// True for an allocator's out-of-memory error, also when TorchScript or autograd re-threw it as a plain c10::Error.
bool is_out_of_memory(const std::exception& error);

// Returns the CUDA allocator's cached, unused blocks to the driver (no-op without CUDA).
void release_cached_device_memory();

}  // namespace loratune
