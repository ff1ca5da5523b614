#include "loratune/safetensors.h"

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <functional>
#include <limits>
#include <vector>

#include "loratune/errors.h"
#include "common/files.h"

namespace loratune::safetensors {
namespace {

using nlohmann::json;

constexpr int kMaxHeaderDepth = 3;
constexpr size_t kMaxTensors = 100000;
constexpr size_t kMaxNameBytes = 4096;
constexpr size_t kMaxDims = 16;

struct DtypeName {
  const char* name;
  at::ScalarType type;
};

constexpr DtypeName kDtypes[] = {
    {"F64", at::kDouble}, {"F32", at::kFloat}, {"F16", at::kHalf},   {"BF16", at::kBFloat16},
    {"I64", at::kLong},   {"I32", at::kInt},   {"I16", at::kShort},  {"I8", at::kChar},
    {"U8", at::kByte},    {"BOOL", at::kBool},
};

const char* dtype_name(at::ScalarType type) {
  for (const auto& d : kDtypes)
    if (d.type == type) return d.name;
  throw InputError(std::string("safetensors cannot store tensors of type ") + c10::toString(type));
}

at::ScalarType dtype_from_name(const std::string& name, const std::string& where) {
  for (const auto& d : kDtypes)
    if (name == d.name) return d.type;
  throw InputError(where + ": unsupported dtype \"" + name + "\" (supported: F64 F32 F16 BF16 I64 I32 I16 I8 U8 BOOL)");
}

uint64_t read_u64_le(const char* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | static_cast<unsigned char>(p[i]);
  return v;
}

struct Entry {
  std::string name;
  at::ScalarType dtype;
  std::vector<int64_t> shape;
  uint64_t begin, end;
};

Entry parse_entry(const std::string& name, const json& value, const std::string& origin) {
  const std::string where = origin + ": tensor \"" + name + "\"";
  if (!value.is_object()) throw InputError(where + ": header entry is not an object");
  if (!value.contains("dtype") || !value["dtype"].is_string()) throw InputError(where + ": missing dtype");
  if (!value.contains("shape") || !value["shape"].is_array()) throw InputError(where + ": missing shape");
  if (!value.contains("data_offsets") || !value["data_offsets"].is_array() || value["data_offsets"].size() != 2)
    throw InputError(where + ": data_offsets must be [begin, end]");
  Entry e{name, dtype_from_name(value["dtype"].get<std::string>(), where), {}, 0, 0};
  if (value["shape"].size() > kMaxDims) throw InputError(where + ": more than " + std::to_string(kMaxDims) + " dimensions");
  uint64_t numel = 1;
  for (const auto& d : value["shape"]) {
    if (!d.is_number_unsigned()) throw InputError(where + ": shape must hold non-negative integers");
    const uint64_t dim = d.get<uint64_t>();
    if (dim > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) ||
        (dim != 0 && numel > std::numeric_limits<uint64_t>::max() / dim))
      throw InputError(where + ": shape is too large");
    numel *= dim;
    e.shape.push_back(static_cast<int64_t>(dim));
  }
  for (const auto& o : value["data_offsets"])
    if (!o.is_number_unsigned()) throw InputError(where + ": data_offsets must be non-negative integers");
  e.begin = value["data_offsets"][0].get<uint64_t>();
  e.end = value["data_offsets"][1].get<uint64_t>();
  if (e.end < e.begin) throw InputError(where + ": data_offsets end before they begin");
  const uint64_t item = c10::elementSize(e.dtype);
  if (numel > std::numeric_limits<uint64_t>::max() / item || numel * item != e.end - e.begin)
    throw InputError(where + ": " + std::to_string(e.end - e.begin) + " data bytes do not match its shape and dtype");
  return e;
}

// The deepest nesting of objects and arrays in JSON text (brackets inside strings not counted).
int json_nesting_depth(std::string::const_iterator begin, std::string::const_iterator end) {
  int depth = 0, deepest = 0;
  bool in_string = false, escaped = false;
  for (auto it = begin; it != end; ++it) {
    const char c = *it;
    if (in_string) {
      if (escaped) escaped = false;
      else if (c == '\\') escaped = true;
      else if (c == '"') in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '{' || c == '[') {
      deepest = std::max(deepest, ++depth);
    } else if (c == '}' || c == ']') {
      --depth;
    }
  }
  return deepest;
}

// The header's length from the first 8 bytes of a file of `file_size` bytes, checked.
uint64_t header_length(const char* first8, uint64_t file_size, const std::string& origin) {
  if (file_size < 8) throw InputError(origin + ": not a safetensors file (shorter than its 8-byte header length)");
  const uint64_t header_len = read_u64_le(first8);
  if (header_len > kMaxHeaderBytes)
    throw InputError(origin + ": not a safetensors file (header length " + std::to_string(header_len) +
                     " is over the 100 MB limit)");
  if (header_len > file_size - 8)
    throw InputError(origin + ": truncated or not a safetensors file (header length " + std::to_string(header_len) +
                     " runs past the end of the " + std::to_string(file_size) + "-byte file)");
  return header_len;
}

// Parses `head` (the length and header: at least 8 + header length bytes) of a file of `file_size` bytes and
// fills each tensor with `read_data(offset in the data section, destination, bytes)`.
Contents decode(const std::string& head, uint64_t file_size, const std::string& origin,
                const std::function<void(uint64_t, void*, size_t)>& read_data) {
  const uint64_t header_len = read_u64_le(head.data());  // checked by header_length()
  json header;
  const auto text_begin = head.begin() + 8, text_end = text_begin + static_cast<std::ptrdiff_t>(header_len);
  // The header is {name: {dtype, shape: [...], data_offsets: [...]}}: anything nested deeper is not a header. Checked
  // by a scan before parsing (a parser callback would make nlohmann's parser quadratic in the number of tensors).
  if (json_nesting_depth(text_begin, text_end) > kMaxHeaderDepth + 1)
    throw InputError(origin + ": not a safetensors header (JSON nested too deeply)");
  try {
    header = json::parse(text_begin, text_end);
  } catch (const json::exception& e) {
    throw InputError(origin + ": header is not valid JSON (" + std::string(e.what()) + ")");
  }
  if (!header.is_object()) throw InputError(origin + ": header is not a JSON object");

  const uint64_t data_size = file_size - 8 - header_len;
  Contents out;
  std::vector<Entry> entries;
  if (header.size() > kMaxTensors)
    throw InputError(origin + ": " + std::to_string(header.size()) + " tensors (limit " + std::to_string(kMaxTensors) + ")");
  for (const auto& [name, value] : header.items()) {
    if (name.size() > kMaxNameBytes)
      throw InputError(origin + ": a tensor name is " + std::to_string(name.size()) + " bytes long (limit " +
                       std::to_string(kMaxNameBytes) + ")");
    if (name == "__metadata__") {
      if (!value.is_object()) throw InputError(origin + ": __metadata__ must be an object of strings");
      for (const auto& [k, v] : value.items()) {
        if (!v.is_string()) throw InputError(origin + ": __metadata__ value of \"" + k + "\" is not a string");
        out.metadata[k] = v.get<std::string>();
      }
      continue;
    }
    entries.push_back(parse_entry(name, value, origin));
  }
  // Offsets must tile the data region exactly: no overlaps, no holes, nothing after the last tensor.
  std::vector<const Entry*> by_offset;
  for (const auto& e : entries) by_offset.push_back(&e);
  std::sort(by_offset.begin(), by_offset.end(), [](const Entry* a, const Entry* b) {
    return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
  });
  uint64_t expected = 0;
  for (const Entry* e : by_offset) {
    if (e->begin < expected)
      throw InputError(origin + ": tensor \"" + e->name + "\" overlaps another tensor's data");
    if (e->begin > expected) throw InputError(origin + ": unused bytes before tensor \"" + e->name + "\"");
    if (e->end > data_size)
      throw InputError(origin + ": truncated file (tensor \"" + e->name + "\" ends at byte " + std::to_string(e->end) +
                       " of a " + std::to_string(data_size) + "-byte data section)");
    expected = e->end;
  }
  if (expected != data_size)
    throw InputError(origin + ": " + std::to_string(data_size - expected) + " unused bytes after the last tensor");

  for (const auto& e : entries) {
    at::Tensor t = at::empty(e.shape, at::TensorOptions().dtype(e.dtype));
    if (e.end > e.begin) read_data(e.begin, t.data_ptr(), static_cast<size_t>(e.end - e.begin));
    out.tensors.emplace(e.name, std::move(t));
  }
  return out;
}

}  // namespace

Contents parse(const std::string& bytes, const std::string& origin) {
  const uint64_t data_start = 8 + header_length(bytes.data(), bytes.size(), origin);
  return decode(bytes, bytes.size(), origin, [&](uint64_t offset, void* to, size_t n) {
    std::memcpy(to, bytes.data() + data_start + offset, n);
  });
}

// Reads tensor by tensor from the file: memory holds the tensors, not the file besides them.
Contents read(const std::filesystem::path& path) {
  const std::string origin = path.string();
  std::ifstream in(path, std::ios::binary);
  if (!in) throw InputError(origin + ": cannot be opened");
  in.seekg(0, std::ios::end);
  const auto file_size = static_cast<uint64_t>(in.tellg());
  in.seekg(0);
  std::string head(8, '\0');
  if (file_size >= 8) in.read(head.data(), 8);
  if (file_size < 8 || !in) throw InputError(origin + ": not a safetensors file (shorter than its 8-byte header length)");
  const uint64_t header_len = header_length(head.data(), file_size, origin);
  head.resize(8 + header_len);
  in.read(head.data() + 8, static_cast<std::streamsize>(header_len));
  if (!in) throw InputError(origin + ": cannot read its header");
  return decode(head, file_size, origin, [&](uint64_t offset, void* to, size_t n) {
    in.seekg(static_cast<std::streamoff>(8 + header_len + offset));
    in.read(static_cast<char*>(to), static_cast<std::streamsize>(n));
    if (!in) throw InputError(origin + ": cannot read tensor data (the file changed or a disk error)");
  });
}

std::string serialize(const Tensors& tensors, const Metadata& metadata) {
  json header = json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::vector<at::Tensor> cpu;
  uint64_t offset = 0;
  for (const auto& [name, tensor] : tensors) {
    if (name == "__metadata__") throw InputError("a tensor cannot be named __metadata__");
    at::Tensor t = tensor.detach().to(at::kCPU).contiguous();
    const uint64_t size = t.numel() * t.element_size();
    header[name] = {{"dtype", dtype_name(t.scalar_type())}, {"shape", t.sizes().vec()}, {"data_offsets", {offset, offset + size}}};
    offset += size;
    cpu.push_back(std::move(t));
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((text.size() >> (8 * i)) & 0xff);
  out += text;
  out.reserve(out.size() + offset);
  for (const auto& t : cpu) out.append(static_cast<const char*>(t.data_ptr()), t.numel() * t.element_size());
  return out;
}

void write(const std::filesystem::path& path, const Tensors& tensors, const Metadata& metadata) {
  write_file_atomic(path, serialize(tensors, metadata));
}

}  // namespace loratune::safetensors
