// The checkpoint file: the run's tensors (adapters, optimiser state, random generators) and its progress, with a
// checksum over all of them, so that a damaged file is refused instead of resumed.
#pragma once

#include <filesystem>
#include <string>

#include "loratune/safetensors.h"

namespace loratune {

constexpr const char* kCheckpointFormat = "loratune.checkpoint/2";

// Writes `tensors` and `metadata` (with "format" and "checksum" added) atomically.
void write_checkpoint(const std::filesystem::path& path, const safetensors::Tensors& tensors,
                      safetensors::Metadata metadata);

// Reads a checkpoint written by write_checkpoint: InputError naming the file when it is not one, or when its
// checksum does not match its contents (damaged, or edited by hand).
safetensors::Contents read_checkpoint(const std::filesystem::path& path);

// The stored tensor `key` that replaces `like` on resume: InputError naming `origin` and the key when it is missing,
// has another dtype or shape, or holds inf or NaN.
const at::Tensor& stored_like(const safetensors::Tensors& tensors, const std::string& key, const at::Tensor& like,
                              const std::string& origin);

}  // namespace loratune
