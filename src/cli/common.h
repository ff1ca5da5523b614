// Helpers shared by the command implementations.
#pragma once

#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "loratune/adapter_binding.h"
#include "loratune/amp.h"
#include "loratune/config.h"
#include "loratune/evaluate.h"
#include "loratune/image_folder.h"
#include "loratune/loader.h"
#include "loratune/model.h"

namespace loratune::cli {

// Console logging (and a copy in `log_file` when given).
void setup_logging(const std::filesystem::path& log_file = {});

// A model to run inference with: a merged classifier, or a backbone bundle with an adapter.
struct InferenceModel {
  std::unique_ptr<Model> adapted;    // backbone + adapter
  torch::jit::Module classifier;     // merged classifier
  BundleInfo info;
  std::vector<std::string> classes;
  bool merged = false;

  ForwardFn forward();
};
InferenceModel load_inference_model(const std::string& model, const std::string& adapter, const c10::Device& device);

// Prints a table with aligned columns (UTF-8 aware).
std::string format_table(const std::vector<std::string>& header, const std::vector<std::vector<std::string>>& rows);

}  // namespace loratune::cli
