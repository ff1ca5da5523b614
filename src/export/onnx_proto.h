// The parts of the ONNX format (onnx.proto, IR version 8) that the exporter writes, encoded as protobuf by hand:
// no protobuf library, and the same bytes from every LibTorch version.
#pragma once

#include <ATen/Tensor.h>

#include <cstdint>
#include <filesystem>
#include <string>
#include <utility>
#include <vector>

namespace loratune::onnx {

// TensorProto.DataType values.
enum class DataType : int32_t { kFloat = 1, kInt64 = 7, kBool = 9, kFloat16 = 10 };
DataType data_type_of(const at::Tensor& tensor);  // InputError for dtypes the exporter does not write

struct Attribute {
  enum class Kind { kFloat = 1, kInt = 2, kInts = 7 };  // AttributeProto.AttributeType values
  std::string name;
  Kind kind = Kind::kInt;
  double f = 0;
  int64_t i = 0;
  std::vector<int64_t> ints;

  static Attribute integer(std::string name, int64_t value);
  static Attribute real(std::string name, double value);
  static Attribute integers(std::string name, std::vector<int64_t> values);
};

struct Node {
  std::string op_type;
  std::vector<std::string> inputs, outputs;
  std::vector<Attribute> attributes;
  std::string name;
};

// A graph input or output: its element type and shape, a dimension either a size or a name ("batch").
struct ValueInfo {
  std::string name;
  DataType type = DataType::kFloat;
  std::vector<std::pair<int64_t, std::string>> dims;
};

struct Model {
  std::string graph_name;
  std::vector<Node> nodes;
  std::vector<std::pair<std::string, at::Tensor>> initializers;  // contiguous CPU tensors
  std::vector<ValueInfo> inputs, outputs;
  std::vector<std::pair<std::string, std::string>> metadata;  // metadata_props
  int64_t opset = 17;
  std::string producer_version;
};

// Writes the ModelProto to `path` atomically, streamed: tensor data goes from the tensors' memory to the file with no
// copy. With `external_data`, tensors over `external_threshold` bytes go to `external_data` (ONNX's external data
// format: location, offset, length; written first, also atomically) and the model names it by file name. InputError
// when the model file would reach protobuf's 2 GB limit (nothing written).
void write_model(const Model& model, const std::filesystem::path& path, const std::filesystem::path& external_data = {},
                 int64_t external_threshold = 0);

}  // namespace loratune::onnx
