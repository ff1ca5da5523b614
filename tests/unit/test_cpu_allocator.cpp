// The caching CPU allocator: which freed blocks serve which requests, and what it holds across batches of
// different sizes (the resident set `plan` predicts follows from it).
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <vector>

#include "loratune/cpu_allocator.h"

namespace loratune {
namespace {

constexpr int64_t kMiB = 1 << 20;

at::Tensor bytes(int64_t n) { return at::empty({n}, at::kByte); }

int64_t held() {
  const CpuAllocatorStats s = cpu_allocator_stats();
  return s.in_use + s.cached;
}

class CpuAllocator : public ::testing::Test {
 protected:
  void SetUp() override {
    install_caching_cpu_allocator();
    release_cached_cpu_memory();
  }
};

TEST_F(CpuAllocator, ASmallerRequestReusesACachedBlockUpToTwiceItsSize) {
  const int64_t before = held();
  { at::Tensor big = bytes(16 * kMiB); }
  EXPECT_EQ(cpu_allocator_stats().cached, 16 * kMiB);
  {
    at::Tensor smaller = bytes(10 * kMiB);
    EXPECT_EQ(cpu_allocator_stats().cached, 0) << "the 16 MiB block should serve a 10 MiB request";
    EXPECT_EQ(held() - before, 16 * kMiB);
  }
  {
    at::Tensor larger = bytes(18 * kMiB);
    EXPECT_EQ(cpu_allocator_stats().cached, 16 * kMiB) << "no block serves a larger request";
  }
  EXPECT_EQ(held() - before, 34 * kMiB);
  {
    at::Tensor small = bytes(7 * kMiB);
    EXPECT_EQ(cpu_allocator_stats().cached, 34 * kMiB) << "blocks over twice the request stay cached";
  }
  EXPECT_EQ(cpu_allocator_stats().cached, 41 * kMiB);
}

TEST_F(CpuAllocator, AShorterLastBatchHoldsNoMoreThanAFullOne) {
  // A step's live tensors scale with the batch: full batches of 16, then a last batch of 10, then validation.
  auto step = [](int64_t images) {
    std::vector<at::Tensor> live;
    for (int layer = 0; layer < 12; ++layer) live.push_back(bytes(images * 600 * 1024));
  };
  const CpuAllocatorStats before = cpu_allocator_stats();
  for (int i = 0; i < 3; ++i) step(16);
  const int64_t full = held() - (before.in_use + before.cached);
  EXPECT_EQ(full, 12 * 10 * kMiB);  // 12 blocks of the 9.4 MiB tensors' size class
  step(10);
  step(9);
  EXPECT_EQ(held() - (before.in_use + before.cached), full);
  EXPECT_EQ(cpu_allocator_stats().in_use, before.in_use);
}

}  // namespace
}  // namespace loratune
