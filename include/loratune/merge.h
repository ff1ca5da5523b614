// Folding an adapter into its base: W += strength * s * B @ A, computed in fp32 into a fresh load of the original
// TorchScript file, so the result is a drop-in replacement (the rewritten training graph is never exported).
#pragma once

#include <filesystem>
#include <string>
#include <vector>

#include "loratune/adapter.h"

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

// Writes the merged model to `output` (atomically) and checks it against the unmerged adapted model.
MergeReport merge_adapter(const std::filesystem::path& base_path, const std::filesystem::path& adapter_path,
                          const std::filesystem::path& output, const MergeOptions& options);

}  // namespace loratune
