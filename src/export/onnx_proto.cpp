#include "export/onnx_proto.h"

#include <cstring>

#include "loratune/errors.h"

namespace loratune::onnx {
namespace {

// Protobuf wire format: varints, and length-delimited fields for strings and nested messages.
class Writer {
 public:
  void varint(uint64_t v) {
    while (v >= 0x80) {
      out_.push_back(static_cast<char>((v & 0x7f) | 0x80));
      v >>= 7;
    }
    out_.push_back(static_cast<char>(v));
  }
  void tag(int field, int wire_type) { varint(static_cast<uint64_t>(field) << 3 | static_cast<uint64_t>(wire_type)); }
  void int_field(int field, int64_t v) {
    tag(field, 0);
    varint(static_cast<uint64_t>(v));
  }
  void bytes_field(int field, const std::string& bytes) {
    tag(field, 2);
    varint(bytes.size());
    out_ += bytes;
  }
  void float_field(int field, float v) {
    tag(field, 5);
    char b[4];
    std::memcpy(b, &v, 4);
    out_.append(b, 4);
  }
  const std::string& str() const { return out_; }

 private:
  std::string out_;
};

std::string attribute_bytes(const Attribute& a) {
  Writer w;
  w.bytes_field(1, a.name);
  switch (a.kind) {
    case Attribute::Kind::kFloat: w.float_field(2, static_cast<float>(a.f)); break;
    case Attribute::Kind::kInt: w.int_field(3, a.i); break;
    case Attribute::Kind::kString: w.bytes_field(4, a.s); break;
    case Attribute::Kind::kFloats:
      for (const double f : a.floats) w.float_field(7, static_cast<float>(f));
      break;
    case Attribute::Kind::kInts:
      for (const int64_t i : a.ints) w.int_field(8, i);
      break;
  }
  w.int_field(20, static_cast<int64_t>(a.kind));
  return w.str();
}

std::string node_bytes(const Node& n) {
  Writer w;
  for (const auto& i : n.inputs) w.bytes_field(1, i);
  for (const auto& o : n.outputs) w.bytes_field(2, o);
  if (!n.name.empty()) w.bytes_field(3, n.name);
  w.bytes_field(4, n.op_type);
  for (const auto& a : n.attributes) w.bytes_field(5, attribute_bytes(a));
  return w.str();
}

std::string entry_bytes(const std::string& key, const std::string& value) {
  Writer w;
  w.bytes_field(1, key);
  w.bytes_field(2, value);
  return w.str();
}

std::string tensor_bytes(const std::string& name, const at::Tensor& t, const std::string& external_file,
                         int64_t external_threshold, std::string& external_data) {
  Writer w;
  for (const int64_t d : t.sizes()) w.int_field(1, d);
  w.int_field(2, static_cast<int64_t>(data_type_of(t)));
  w.bytes_field(8, name);
  const auto* data = static_cast<const char*>(t.data_ptr());
  const auto size = static_cast<int64_t>(t.nbytes());
  if (!external_file.empty() && size > external_threshold) {
    external_data.append(static_cast<size_t>(-external_data.size() % 64), '\0');  // aligned for memory mapping
    w.bytes_field(13, entry_bytes("location", external_file));
    w.bytes_field(13, entry_bytes("offset", std::to_string(external_data.size())));
    w.bytes_field(13, entry_bytes("length", std::to_string(size)));
    w.int_field(14, 1);  // EXTERNAL
    external_data.append(data, static_cast<size_t>(size));
  } else {
    w.bytes_field(9, std::string(data, static_cast<size_t>(size)));
  }
  return w.str();
}

std::string value_info_bytes(const ValueInfo& v) {
  Writer shape;
  for (const auto& [size, param] : v.dims) {
    Writer dim;
    if (param.empty()) dim.int_field(1, size);
    else dim.bytes_field(2, param);
    shape.bytes_field(1, dim.str());
  }
  Writer tensor_type;
  tensor_type.int_field(1, static_cast<int64_t>(v.type));
  tensor_type.bytes_field(2, shape.str());
  Writer type;
  type.bytes_field(1, tensor_type.str());
  Writer w;
  w.bytes_field(1, v.name);
  w.bytes_field(2, type.str());
  return w.str();
}

}  // namespace

DataType data_type_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DataType::kFloat;
    case at::kLong: return DataType::kInt64;
    case at::kBool: return DataType::kBool;
    case at::kHalf: return DataType::kFloat16;
    default: throw InputError(std::string("ONNX export: tensors of type ") + c10::toString(t.scalar_type()) +
                              " are not written");
  }
}

Attribute Attribute::integer(std::string name, int64_t value) {
  Attribute a;
  a.name = std::move(name), a.kind = Kind::kInt, a.i = value;
  return a;
}
Attribute Attribute::real(std::string name, double value) {
  Attribute a;
  a.name = std::move(name), a.kind = Kind::kFloat, a.f = value;
  return a;
}
Attribute Attribute::text(std::string name, std::string value) {
  Attribute a;
  a.name = std::move(name), a.kind = Kind::kString, a.s = std::move(value);
  return a;
}
Attribute Attribute::integers(std::string name, std::vector<int64_t> values) {
  Attribute a;
  a.name = std::move(name), a.kind = Kind::kInts, a.ints = std::move(values);
  return a;
}

Serialized serialize(const Model& m, const std::string& external_file, int64_t external_threshold) {
  Serialized out;
  Writer graph;
  for (const auto& n : m.nodes) graph.bytes_field(1, node_bytes(n));
  graph.bytes_field(2, m.graph_name);
  for (const auto& [name, t] : m.initializers)
    graph.bytes_field(5, tensor_bytes(name, t, external_file, external_threshold, out.external_data));
  for (const auto& v : m.inputs) graph.bytes_field(11, value_info_bytes(v));
  for (const auto& v : m.outputs) graph.bytes_field(12, value_info_bytes(v));

  Writer model;
  model.int_field(1, 8);  // IR version 8: opsets up to 18
  model.bytes_field(2, "loratune");
  model.bytes_field(3, m.producer_version);
  model.bytes_field(7, graph.str());
  Writer opset;
  opset.bytes_field(1, "");
  opset.int_field(2, m.opset);
  model.bytes_field(8, opset.str());
  for (const auto& [key, value] : m.metadata) model.bytes_field(14, entry_bytes(key, value));
  out.model = model.str();
  return out;
}

}  // namespace loratune::onnx
