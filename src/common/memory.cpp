#include "loratune/memory.h"
#include "loratune/device.h"

#include <fstream>
#include <sstream>

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

}  // namespace

bool cuda_available() { return torch::cuda::is_available(); }

MemoryReading read_memory(const c10::Device& device) {
  MemoryReading r;
  r.rss = proc_status_kb("VmRSS") * 1024;
  r.peak_rss = proc_status_kb("VmHWM") * 1024;
#ifdef LORATUNE_WITH_CUDA
  if (device.is_cuda()) {
    const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device.index() < 0 ? 0 : device.index());
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
#ifdef LORATUNE_WITH_CUDA
  if (device.is_cuda()) c10::cuda::CUDACachingAllocator::resetPeakStats(device.index() < 0 ? 0 : device.index());
#endif
}

int64_t peak_memory(const c10::Device& device) {
  const auto r = read_memory(device);
  return device.is_cuda() ? r.device_peak_allocated : r.peak_rss;
}

void limit_device_memory(double gib) {
#ifdef LORATUNE_WITH_CUDA
  if (!cuda_available()) return;
  size_t free = 0, total = 0;
  C10_CUDA_CHECK(cudaMemGetInfo(&free, &total));
  c10::cuda::CUDACachingAllocator::setMemoryFraction(std::min(1.0, gib * 1024.0 * 1024.0 * 1024.0 / total), 0);
#else
  (void)gib;
#endif
}

std::string memory_status(const c10::Device& device) {
  const auto r = read_memory(device);
  if (device.is_cuda()) return "gpu " + human_bytes(r.device_allocated) + " (peak " + human_bytes(r.device_peak_allocated) + ")";
  return "rss " + human_bytes(r.rss);
}

}  // namespace loratune
