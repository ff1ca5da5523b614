// Folding an adapter into its base: each adapted weight's rows become its variant's merged rows (LoRA:
// W + s * B @ A; DoRA: m * (W + s * B @ A) / ||W + s * B @ A|| per row), interpolated from W by `strength`, computed
// in fp32 into a fresh load of the original TorchScript file, so the result is a drop-in replacement (the rewritten
// training graph is never exported).
#pragma once

#include <filesystem>
#include <string>
#include <vector>

namespace loratune {

struct MergeOptions {
  double strength = 1.0;       // 0 = base, 1 = adapted; in between interpolates the weights (WiSE-FT)
  bool features_only = false;  // write a backbone bundle (images -> features) instead of a classifier
  int64_t probe_batch = 4;     // images in the check batch
  uint64_t probe_seed = 0;
};

struct MergeReport {
  std::vector<std::string> merged;  // what changed, one line per weight
  double max_abs_diff = 0.0;        // max |merged - adapted| over the probe batch
  std::string output;
};

// The most a merged model may differ from the adapted one on the probe batch (fp32 rounding is ~1e-6).
inline constexpr double kMergeTolerance = 1e-3;

// Writes the merged model to a temporary file, checks it against the unmerged adapted model, then puts it at
// `output`. InputError if `output` is the base or part of the adapter; RuntimeFailure, with `output` untouched, if
// the check fails.
MergeReport merge_adapter(const std::filesystem::path& base_path, const std::filesystem::path& adapter_path,
                          const std::filesystem::path& output, const MergeOptions& options);

}  // namespace loratune
