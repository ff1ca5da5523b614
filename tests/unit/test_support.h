// Helpers shared by the C++ tests.
#pragma once

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "loratune/errors.h"

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
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

// Bounded mutation fuzzing: bit flips, byte sets, truncation, duplication and header-length edits of a valid file.
inline std::string mutate(const std::string& in, std::mt19937_64& rng) {
  std::string s = in;
  const int edits = 1 + static_cast<int>(rng() % 4);
  for (int e = 0; e < edits && !s.empty(); ++e) {
    const size_t at = rng() % s.size();
    switch (rng() % 6) {
      case 0: s[at] = static_cast<char>(s[at] ^ (1 << (rng() % 8))); break;
      case 1: s[at] = static_cast<char>(rng()); break;
      case 2: s.resize(at); break;
      case 3: s.insert(at, s.substr(at, rng() % 64)); break;
      case 4: if (s.size() > 8) s[rng() % 8] = static_cast<char>(rng()); break;  // the length prefix
      default: s[at] = "{}[]\":,0-e"[rng() % 10]; break;                         // JSON structure
    }
  }
  return s;
}

struct FuzzCount {
  int mutations = 0, loaded = 0;
};

template <typename Load>
FuzzCount fuzz(const std::string& original, const std::filesystem::path& file, int iterations, double seconds, Load load) {
  std::mt19937_64 rng(12345);
  const auto start = std::chrono::steady_clock::now();
  int loaded = 0, i = 0;
  for (; i < iterations; ++i) {
    if (std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() > seconds) break;
    const std::string bytes = mutate(original, rng);
    {
      std::ofstream out(file, std::ios::binary | std::ios::trunc);
      out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    }
    try {
      load();
      ++loaded;
    } catch (const loratune::InputError&) {
    } catch (const std::exception& e) {
      ADD_FAILURE() << "mutation " << i << " escaped as " << typeid(e).name() << ": " << e.what();
      break;
    }
  }
  std::printf("fuzz %s: %d mutations, %d still loaded\n", file.filename().c_str(), i, loaded);
  return {i, loaded};
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
