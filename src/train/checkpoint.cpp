#include "train/checkpoint.h"

#include <ATen/ATen.h>

#include "common/fingerprint.h"
#include "loratune/errors.h"

namespace fs = std::filesystem;

namespace loratune {
namespace {

// Over every tensor (name, dtype, shape, bytes) and every metadata entry but the checksum itself.
std::string checksum(const safetensors::Tensors& tensors, const safetensors::Metadata& metadata) {
  uint64_t seed = 0x636b7074ULL;  // "ckpt"
  for (const auto& [key, value] : metadata) {
    if (key == "checksum") continue;
    const std::string entry = key + "=" + value + ";";
    seed = hash_bytes(entry.data(), entry.size(), seed);
  }
  return tensors_fingerprint(tensors, seed);
}

}  // namespace

void write_checkpoint(const fs::path& path, const safetensors::Tensors& tensors, safetensors::Metadata metadata) {
  metadata["format"] = kCheckpointFormat;
  metadata["checksum"] = checksum(tensors, metadata);
  safetensors::write(path, tensors, metadata);
}

safetensors::Contents read_checkpoint(const fs::path& path) {
  safetensors::Contents ckpt = safetensors::read(path);
  const auto format = ckpt.metadata.find("format");
  if (format == ckpt.metadata.end() || format->second.rfind("loratune.checkpoint/", 0) != 0)
    throw InputError(path.string() + " is not a loratune checkpoint");
  if (format->second != kCheckpointFormat)
    throw InputError(path.string() + " is a " + format->second + " file; this loratune resumes " + kCheckpointFormat +
                     " only: finish that run with the loratune that started it, or start a new run");
  const auto stored = ckpt.metadata.find("checksum");
  if (stored == ckpt.metadata.end() || stored->second != checksum(ckpt.tensors, ckpt.metadata))
    throw InputError(path.string() + " is damaged (its checksum does not match its contents); it cannot be resumed: "
                     "restore it from a backup, or start a new run in another output_dir");
  return ckpt;
}

const at::Tensor& stored_like(const safetensors::Tensors& tensors, const std::string& key, const at::Tensor& like,
                              const std::string& origin) {
  auto it = tensors.find(key);
  if (it == tensors.end()) throw InputError(origin + " has no tensor " + key);
  const at::Tensor& t = it->second;
  if (t.scalar_type() != like.scalar_type() || t.sizes() != like.sizes())
    throw InputError(origin + ": " + key + " is " + c10::toString(t.scalar_type()) + " " + c10::str(t.sizes()) +
                     ", this run needs " + c10::toString(like.scalar_type()) + " " + c10::str(like.sizes()));
  if (t.is_floating_point() && !at::isfinite(t).all().item<bool>())
    throw InputError(origin + ": " + key + " holds inf or NaN");
  return t;
}

}  // namespace loratune
