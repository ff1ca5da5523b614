// ONNX export of a bundle, natively: the TorchScript graph of its forward is run on two example batches (2 and 3
// images) node by node, and each node is written as ONNX operators; what differs between the two runs is the batch
// axis and stays dynamic, everything else (shapes, branches, constants) is fixed. Opset 17.
#pragma once

#include <filesystem>
#include <string>
#include <vector>

#include "loratune/bundle.h"

namespace loratune {

struct OnnxExportOptions {
  int64_t opset = 17;
  // Tensors over this many bytes go to "<output>.data" beside the model (ONNX's external data); the model file alone
  // must stay under protobuf's 2 GB.
  int64_t external_data_threshold = 1024;
  bool external_data = false;  // false: every tensor inside the model file, which must then stay under 2 GB
  // Weights and computation in float16 (half the file); the graph's image input and its output stay float32.
  bool fp16 = false;
};

struct OnnxExportReport {
  int64_t nodes = 0;
  int64_t initializers = 0;
  int64_t bytes = 0;  // model file, plus external data
  std::string input, output;  // the graph's input and output names
};

// Writes the forward of `bundle` (images [N,3,S,S] -> logits or features; N dynamic) to `output` atomically, with
// the preprocessing in the model's metadata_props (mean, std, image_size, resize_size, interpolation, classes as
// JSON). InputError naming the operator and the module for an operator with no ONNX mapping; nothing is written.
OnnxExportReport export_onnx(const Bundle& bundle, const std::filesystem::path& output,
                             const OnnxExportOptions& options = {});

// Writes `folder` (atomically, replaced as a whole): model.onnx as export_onnx writes it, index.html (drop photos on
// it: top classes by name, computed in the browser) and ort/ with onnxruntime-web's single-threaded WebAssembly build
// copied from `web_runtime` (the dist folder of the npm package onnxruntime-web). Image classifiers and backbones.
OnnxExportReport export_web_page(const Bundle& bundle, const std::filesystem::path& folder,
                                 const std::filesystem::path& web_runtime, const OnnxExportOptions& options = {});

// Where onnxruntime-web's dist folder is when none is given: $LORATUNE_ONNXRUNTIME_WEB, then beside `executable`
// (<prefix>/share/loratune/onnxruntime-web, or a build folder's onnx_runtime/node_modules/onnxruntime-web/dist).
// Empty when none holds it.
std::filesystem::path find_web_runtime(const std::filesystem::path& executable);

}  // namespace loratune
