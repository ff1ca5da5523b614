// Folding an adapter into its base: each adapted weight's rows become its variant's merged rows (LoRA:
// W + s * B @ A; DoRA: m * (W + s * B @ A) / ||W + s * B @ A|| per row), interpolated from W by `strength`, computed
// in fp32 into a fresh load of the original TorchScript file, so the result is a drop-in replacement (the rewritten
// training graph is never exported).
#pragma once

#include <ATen/Tensor.h>

#include <nlohmann/json.hpp>

#include <filesystem>
#include <functional>
#include <string>
#include <utility>
#include <vector>

namespace loratune {

struct MergeOptions {
  double strength = 1.0;       // 0 = base, 1 = adapted; in between interpolates the weights (WiSE-FT)
  bool features_only = false;  // write a backbone bundle (images -> features) instead of a classifier
  int64_t probe_batch = 4;     // images in the check batch
  uint64_t probe_seed = 0;
  // An adapter with text-tower targets (loss contrastive) also merges into its text tower, written beside the output
  // as <output stem>_text<extension>: that tower (empty: the one the base names).
  std::filesystem::path text_model;
  // The head from a merged text tower and the adapter's class prompts (loratune_text: prompt_head_maker()), so
  // that the classifier is the merged CLIP's zero-shot classifier at any strength; empty: the head is interpolated
  // from its zero-shot start.
  std::function<std::pair<at::Tensor, at::Tensor>(const std::filesystem::path& text_model, const nlohmann::json& prompts,
                                                  const std::vector<std::string>& classes)>
      text_head;
};

struct MergeReport {
  std::vector<std::string> merged;  // what changed, one line per weight
  double max_abs_diff = 0.0;        // max |merged - adapted| over the probe batch
  std::string output;
  std::string text_output;     // the merged text tower, or empty
  double text_max_abs_diff = 0.0;
};

// Where the merged text tower of `output` goes: "merged.pt" -> "merged_text.pt".
std::filesystem::path merged_text_path(const std::filesystem::path& output);

// The most a merged model may differ from the adapted one on the probe batch (fp32 rounding is ~1e-6).
inline constexpr double kMergeTolerance = 1e-3;

// Writes the merged model to a temporary file, checks it against the unmerged adapted model, then puts it at
// `output`. InputError if `output` is the base or part of the adapter; RuntimeFailure, with `output` untouched, if
// the check fails.
MergeReport merge_adapter(const std::filesystem::path& base_path, const std::filesystem::path& adapter_path,
                          const std::filesystem::path& output, const MergeOptions& options);

}  // namespace loratune
