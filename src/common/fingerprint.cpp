#include "common/fingerprint.h"

#include <cstdio>
#include <cstring>
#include <map>

namespace loratune {
namespace {

constexpr uint64_t kMulA = 0x9e3779b97f4a7c15ULL;
constexpr uint64_t kMulB = 0xc2b2ae3d27d4eb4fULL;

inline uint64_t rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }
inline uint64_t mix_word(uint64_t lane, uint64_t word) { return rotl(lane + word * kMulB, 31) * kMulA; }
inline uint64_t finalize(uint64_t h) {
  h ^= h >> 33;
  h *= kMulB;
  h ^= h >> 29;
  h *= kMulA;
  return h ^ (h >> 32);
}

}  // namespace

// Four independent lanes over 32-byte stripes, then the tail word by word: fast enough for multi-GB weights.
uint64_t hash_bytes(const void* data, size_t size, uint64_t seed) {
  const auto* p = static_cast<const unsigned char*>(data);
  uint64_t lanes[4] = {seed + kMulA, seed ^ kMulB, seed, seed - kMulA};
  size_t i = 0;
  for (; i + 32 <= size; i += 32)
    for (int l = 0; l < 4; ++l) {
      uint64_t w;
      std::memcpy(&w, p + i + 8 * l, 8);
      lanes[l] = mix_word(lanes[l], w);
    }
  uint64_t h = rotl(lanes[0], 1) + rotl(lanes[1], 7) + rotl(lanes[2], 12) + rotl(lanes[3], 18) + size;
  for (; i < size; ++i) h = mix_word(h, p[i]);
  return finalize(h);
}

std::string tensors_fingerprint(const std::map<std::string, at::Tensor>& tensors, uint64_t seed) {
  uint64_t h = seed;
  for (const auto& [name, tensor] : tensors) {
    const at::Tensor t = tensor.detach().to(at::kCPU).contiguous();
    const std::string header = name + "|" + c10::toString(t.scalar_type()) + "|" + c10::str(t.sizes());
    h = hash_bytes(header.data(), header.size(), h);
    h = hash_bytes(t.data_ptr(), t.numel() * t.element_size(), h);
  }
  char hex[17];
  std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(h));
  return hex;
}

std::string weights_fingerprint(const torch::jit::Module& module) {
  std::map<std::string, at::Tensor> named;
  for (const auto& p : module.named_parameters(/*recurse=*/true)) named.emplace(p.name, p.value);
  for (const auto& b : module.named_buffers(/*recurse=*/true)) named.emplace(b.name, b.value);
  return tensors_fingerprint(named, 0x6c6f7261ULL);  // "lora"
}

}  // namespace loratune
