#include "loratune/memory.h"
#include "loratune/device.h"
#include "loratune/cpu_allocator.h"

#include <fstream>
#include <sstream>
#include <mutex>
#include <set>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <torch/cuda.h>

#include "common/strings.h"

#ifdef LORATUNE_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime_api.h>
#endif

namespace loratune {
namespace {

int64_t proc_status_kb(const std::string& key) {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind(key + ":", 0) == 0) {
      std::istringstream fields(line.substr(key.size() + 1));
      int64_t kb = 0;
      fields >> kb;
      return kb;
    }
  return 0;
}

#ifdef LORATUNE_WITH_CUDA
// LibTorch 2.x throws "Allocator not initialized" from the allocator's statistics and limits until the device has
// held a tensor; 1.13 did not. Returns the device index the allocator calls take.
c10::DeviceIndex initialised_cuda_device(const c10::Device& device) {
  const c10::DeviceIndex index = device.has_index() ? device.index() : c10::DeviceIndex(0);
  static std::mutex mutex;
  static std::set<c10::DeviceIndex> touched;
  std::lock_guard<std::mutex> lock(mutex);
  if (touched.insert(index).second) at::zeros({1}, at::TensorOptions().device(c10::Device(c10::kCUDA, index)));
  return index;
}
#endif

}  // namespace

bool cuda_available() { return torch::cuda::is_available(); }

MemoryReading read_memory(const c10::Device& device) {
  MemoryReading r;
  r.rss = proc_status_kb("VmRSS") * 1024;
  r.peak_rss = proc_status_kb("VmHWM") * 1024;
#ifdef LORATUNE_WITH_CUDA
  if (device.is_cuda()) {
    const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(initialised_cuda_device(device));
    const auto& all = stats.allocated_bytes[0];  // the aggregate of all pools (index 0 in every LibTorch version)
    r.device_allocated = all.current;
    r.device_peak_allocated = all.peak;
  }
#endif
  return r;
}

void reset_peak_memory(const c10::Device& device) {
  std::ofstream clear("/proc/self/clear_refs");
  clear << "5";
  reset_cpu_allocator_peak();
#ifdef LORATUNE_WITH_CUDA
  if (device.is_cuda()) c10::cuda::CUDACachingAllocator::resetPeakStats(initialised_cuda_device(device));
#endif
}

int64_t peak_memory(const c10::Device& device) {
  const auto r = read_memory(device);
  return device.is_cuda() ? r.device_peak_allocated : r.peak_rss;
}

TensorBytes tensor_bytes(const c10::Device& device) {
  if (device.is_cuda()) {
    const auto r = read_memory(device);
    return {r.device_allocated, r.device_peak_allocated};
  }
  const auto stats = cpu_allocator_stats();
  return {stats.tensor_bytes, stats.peak_tensor_bytes};
}

void limit_device_memory(double gib) {
#ifdef LORATUNE_WITH_CUDA
  if (!cuda_available()) return;
  size_t free = 0, total = 0;
  const c10::DeviceIndex index = initialised_cuda_device(c10::Device(c10::kCUDA, 0));
  C10_CUDA_CHECK(cudaMemGetInfo(&free, &total));
  c10::cuda::CUDACachingAllocator::setMemoryFraction(std::min(1.0, gib * 1024.0 * 1024.0 * 1024.0 / total), index);
#else
  (void)gib;
#endif
}

bool is_out_of_memory(const std::exception& error) {
  if (dynamic_cast<const c10::OutOfMemoryError*>(&error)) return true;
  const std::string text = error.what();
  return text.find("CUDA out of memory") != std::string::npos || text.find("OutOfMemoryError") != std::string::npos;
}

void release_cached_device_memory() {
#ifdef LORATUNE_WITH_CUDA
  if (cuda_available()) c10::cuda::CUDACachingAllocator::emptyCache();
#endif
}

std::string memory_status(const c10::Device& device) {
  const auto r = read_memory(device);
  if (device.is_cuda()) return "gpu " + human_bytes(r.device_allocated) + " (peak " + human_bytes(r.device_peak_allocated) + ")";
  return "rss " + human_bytes(r.rss);
}

}  // namespace loratune
