// Which device to compute on, and what it can do.
#pragma once

#include <c10/core/Device.h>

#include <string>

namespace loratune {

// "auto" (CUDA when present), "cpu", "cuda" or "cuda:N"; InputError for anything else or a missing GPU.
c10::Device resolve_device(const std::string& name);

bool cuda_available();

// True on CUDA GPUs with native bf16 (compute capability 8.0 and later).
bool cuda_bf16_supported();

// Caps what the CUDA caching allocator may take on the current device (e.g. 12 GiB to emulate an RTX 3060).
// No effect without CUDA.
void limit_device_memory(double gib);

}  // namespace loratune
