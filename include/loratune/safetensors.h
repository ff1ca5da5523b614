// safetensors files: 8-byte little-endian header length, JSON header, raw little-endian tensor bytes.
// The reader treats its input as untrusted: every length, offset and shape is checked before use.
#pragma once

#include <ATen/Tensor.h>

#include <filesystem>
#include <map>
#include <string>

namespace loratune::safetensors {

using Tensors = std::map<std::string, at::Tensor>;
using Metadata = std::map<std::string, std::string>;

struct Contents {
  Tensors tensors;
  Metadata metadata;
};

// Largest header accepted, as in the reference implementation.
constexpr size_t kMaxHeaderBytes = 100'000'000;

// Parses a whole file held in memory; `origin` names it in error messages. Throws InputError.
Contents parse(const std::string& bytes, const std::string& origin);
Contents read(const std::filesystem::path& path);

// Serialises CPU or device tensors (copied to CPU, contiguous). Tensors are laid out in name order, the header is
// padded with spaces to a multiple of 8: the same input gives the same bytes.
std::string serialize(const Tensors& tensors, const Metadata& metadata = {});
void write(const std::filesystem::path& path, const Tensors& tensors, const Metadata& metadata = {});

}  // namespace loratune::safetensors
