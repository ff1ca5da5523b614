// The one place where differences between LibTorch versions live.
// Debian's libtorch-dev is 1.13; users build against LibTorch 2.x.
#pragma once

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <torch/csrc/jit/api/function_impl.h>
#include <torch/version.h>

namespace loratune::compat {

// LibTorch 2.4 replaced the per-device autocast functions with ones taking a device type.
#define LORATUNE_TORCH_AT_LEAST_2_4 \
  (TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 4))

// aten::scaled_dot_product_attention (LibTorch 2.0+): fused attention kernels in the modules `loratune import`
// builds; 1.13 computes softmax(q k^T / sqrt(d)) v with plain ops.
#define LORATUNE_TORCH_HAS_SDPA (TORCH_VERSION_MAJOR >= 2)

// Autocast state of one device type (CPU or CUDA).
inline bool autocast_enabled(c10::DeviceType device) {
#if LORATUNE_TORCH_AT_LEAST_2_4
  return at::autocast::is_autocast_enabled(device);
#else
  return device == c10::DeviceType::CUDA ? at::autocast::is_enabled() : at::autocast::is_cpu_enabled();
#endif
}

inline void set_autocast_enabled(c10::DeviceType device, bool enabled) {
#if LORATUNE_TORCH_AT_LEAST_2_4
  at::autocast::set_autocast_enabled(device, enabled);
#else
  if (device == c10::DeviceType::CUDA) at::autocast::set_enabled(enabled);
  else at::autocast::set_cpu_enabled(enabled);
#endif
}

inline at::ScalarType autocast_dtype(c10::DeviceType device) {
#if LORATUNE_TORCH_AT_LEAST_2_4
  return at::autocast::get_autocast_dtype(device);
#else
  return device == c10::DeviceType::CUDA ? at::autocast::get_autocast_gpu_dtype()
                                         : at::autocast::get_autocast_cpu_dtype();
#endif
}

inline void set_autocast_dtype(c10::DeviceType device, at::ScalarType dtype) {
#if LORATUNE_TORCH_AT_LEAST_2_4
  at::autocast::set_autocast_dtype(device, dtype);
#else
  if (device == c10::DeviceType::CUDA) at::autocast::set_autocast_gpu_dtype(dtype);
  else at::autocast::set_autocast_cpu_dtype(dtype);
#endif
}

inline void clear_autocast_cache() { at::autocast::clear_cache(); }

// c10d (src/distributed): ProcessGroupGloo derives from ProcessGroup in 1.13 and from Backend in 2.x; the members
// loratune uses (Options::create, Options::devices, createDeviceForHostname/Interface, createDefaultDevice, the
// constructor, allreduce()->wait, TCPStoreOptions, PrefixStore) read the same in both, so nothing is needed here.

// Graph of a TorchScript method (scripted or traced), for rewriting.
inline std::shared_ptr<torch::jit::Graph> method_graph(torch::jit::Function& fn) {
  return torch::jit::toGraphFunction(fn).graph();
}

// The default random generator of a device (CPU, or the current CUDA device).
inline at::Generator default_generator(const c10::Device& device) {
  return at::globalContext().defaultGenerator(device);
}

}  // namespace loratune::compat
