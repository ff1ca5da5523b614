// Helpers shared by the C++ tests.
#pragma once

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <string>
#include <system_error>
#include <vector>

namespace loratune::test {

inline std::filesystem::path fixture(const std::string& name) {
  return std::filesystem::path(LORATUNE_FIXTURE_DIR) / name;
}

// The directories temp_dir made, removed when the test process ends.
struct TempDirs {
  std::vector<std::filesystem::path> dirs;
  ~TempDirs() {
    std::error_code ec;
    for (const auto& d : dirs) std::filesystem::remove_all(d, ec);
  }
};

// A fresh empty directory under the system temp dir, removed at the end of the test process.
inline std::filesystem::path temp_dir(const std::string& name) {
  static TempDirs made;
  auto dir = std::filesystem::temp_directory_path() / ("loratune_test_" + name + "_" + std::to_string(::getpid()));
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  made.dirs.push_back(dir);
  return dir;
}

inline double max_abs_diff(const at::Tensor& a, const at::Tensor& b) {
  EXPECT_EQ(a.sizes(), b.sizes());
  if (a.sizes() != b.sizes()) return 1e30;
  return (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
}

// max |a - b| relative to the size of the reference b (absolute for values up to 1): float32 rounding grows with
// the magnitude, and gradients of deep models are O(10).
inline double scaled_diff(const at::Tensor& a, const at::Tensor& reference) {
  return max_abs_diff(a, reference) / std::max(1.0, reference.abs().max().item<double>());
}

// Expects `expression` to throw an exception of `type` whose message contains `text`.
#define EXPECT_THROW_WITH(expression, type, text)                                        \
  do {                                                                                   \
    try {                                                                                \
      expression;                                                                        \
      ADD_FAILURE() << "expected " #type " containing \"" << (text) << "\"";            \
    } catch (const type& e) {                                                            \
      EXPECT_NE(std::string(e.what()).find(text), std::string::npos) << e.what();        \
    }                                                                                    \
  } while (0)

}  // namespace loratune::test
