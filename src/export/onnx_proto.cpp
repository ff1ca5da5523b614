#include "export/onnx_proto.h"

#include <cstring>
#include <fstream>

#include "common/files.h"

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

// A piece of the serialized graph: protobuf bytes, then (for a tensor kept inside) its data, written from memory.
struct Piece {
  std::string bytes;
  const char* data = nullptr;
  size_t data_size = 0;
};

// GraphProto.initializer entry for `t`: inside (raw_data) or in the external file at `offset`.
Piece tensor_piece(const std::string& name, const at::Tensor& t, const std::string& location, int64_t offset) {
  Writer w;
  for (const int64_t d : t.sizes()) w.int_field(1, d);
  w.int_field(2, static_cast<int64_t>(data_type_of(t)));
  w.bytes_field(8, name);
  const size_t size = t.nbytes();
  Piece piece;
  if (!location.empty()) {
    w.bytes_field(13, entry_bytes("location", location));
    w.bytes_field(13, entry_bytes("offset", std::to_string(offset)));
    w.bytes_field(13, entry_bytes("length", std::to_string(size)));
    w.int_field(14, 1);  // EXTERNAL
  } else {
    w.tag(9, 2);
    w.varint(size);
    piece.data = static_cast<const char*>(t.data_ptr());
    piece.data_size = size;
  }
  Writer field;  // graph field 5, length-delimited: the header above plus the data
  field.tag(5, 2);
  field.varint(w.str().size() + piece.data_size);
  piece.bytes = field.str() + w.str();
  return piece;
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
Attribute Attribute::integers(std::string name, std::vector<int64_t> values) {
  Attribute a;
  a.name = std::move(name), a.kind = Kind::kInts, a.ints = std::move(values);
  return a;
}

void write_model(const Model& m, const std::filesystem::path& path, const std::filesystem::path& external_data,
                 int64_t external_threshold) {
  std::vector<Piece> graph;
  auto add = [&](int field, const std::string& bytes) {
    Writer w;
    w.bytes_field(field, bytes);
    graph.push_back({w.str()});
  };
  for (const auto& n : m.nodes) add(1, node_bytes(n));
  add(2, m.graph_name);
  std::vector<const at::Tensor*> outside;  // tensors for the external file, in order
  int64_t offset = 0;
  for (const auto& [name, t] : m.initializers) {
    const bool external = !external_data.empty() && static_cast<int64_t>(t.nbytes()) > external_threshold;
    if (external) offset += static_cast<int64_t>(-static_cast<uint64_t>(offset) % 64);  // aligned for mapping
    graph.push_back(tensor_piece(name, t, external ? external_data.filename().string() : "", offset));
    if (external) {
      outside.push_back(&t);
      offset += static_cast<int64_t>(t.nbytes());
    }
  }
  for (const auto& v : m.inputs) add(11, value_info_bytes(v));
  for (const auto& v : m.outputs) add(12, value_info_bytes(v));
  size_t graph_size = 0;
  for (const auto& p : graph) graph_size += p.bytes.size() + p.data_size;

  Writer head, tail;
  head.int_field(1, 8);  // IR version 8: opsets up to 18
  head.bytes_field(2, "loratune");
  head.bytes_field(3, m.producer_version);
  head.tag(7, 2);
  head.varint(graph_size);
  Writer opset;
  opset.bytes_field(1, "");
  opset.int_field(2, m.opset);
  tail.bytes_field(8, opset.str());
  for (const auto& [key, value] : m.metadata) tail.bytes_field(14, entry_bytes(key, value));
  if (head.str().size() + graph_size + tail.str().size() >= (size_t{1} << 31))
    throw InputError("ONNX export: the model is " + std::to_string(graph_size >> 20) + " MB, over protobuf's 2 GB: "
                     "export with external data (--external-data)");

  if (!external_data.empty())
    write_atomic_with(external_data, [&](const std::filesystem::path& temporary) {
      std::ofstream out(temporary, std::ios::binary);
      int64_t at = 0;
      for (const at::Tensor* t : outside) {
        const int64_t pad = static_cast<int64_t>(-static_cast<uint64_t>(at) % 64);
        out.write(std::string(static_cast<size_t>(pad), '\0').data(), pad);
        out.write(static_cast<const char*>(t->data_ptr()), static_cast<std::streamsize>(t->nbytes()));
        at += pad + static_cast<int64_t>(t->nbytes());
      }
      if (!out.flush()) throw RuntimeFailure("cannot write " + external_data.string() + " (disk full?)");
    });
  write_atomic_with(path, [&](const std::filesystem::path& temporary) {
    std::ofstream out(temporary, std::ios::binary);
    out << head.str();
    for (const auto& p : graph) {
      out << p.bytes;
      if (p.data_size > 0) out.write(p.data, static_cast<std::streamsize>(p.data_size));
    }
    out << tail.str();
    if (!out.flush()) throw RuntimeFailure("cannot write " + path.string() + " (disk full?)");
  });
}

}  // namespace loratune::onnx
