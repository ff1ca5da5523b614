// Memory readings for progress bars, summaries and benchmarks.
#pragma once

#include <c10/core/Device.h>

#include <cstdint>
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

// Peak memory that matters for the device: CUDA peak allocated, or peak RSS on CPU.
int64_t peak_memory(const c10::Device& device);

}  // namespace loratune
