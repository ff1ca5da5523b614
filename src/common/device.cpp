// Device queries that need CUDA headers when LibTorch has CUDA.
#include <c10/core/Device.h>

#include "loratune/errors.h"
#include "loratune/device.h"

#ifdef LORATUNE_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#endif

namespace loratune {

bool cuda_bf16_supported() {
#ifdef LORATUNE_WITH_CUDA
  return cuda_available() && at::cuda::getCurrentDeviceProperties()->major >= 8;
#else
  return false;
#endif
}

c10::Device resolve_device(const std::string& name) {
  if (name == "auto") return cuda_available() ? c10::Device(c10::kCUDA, 0) : c10::Device(c10::kCPU);
  if (name == "cpu") return c10::Device(c10::kCPU);
  if (name.rfind("cuda", 0) == 0) {
    if (!cuda_available())
      throw InputError("device \"" + name + "\" asked for, but this build of LibTorch sees no CUDA GPU; use cpu or auto");
    return c10::Device(name);
  }
  throw InputError("device must be auto, cpu or cuda[:N] (got \"" + name + "\")");
}

}  // namespace loratune
