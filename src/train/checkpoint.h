// The checkpoint file: the run's tensors (adapters, optimiser state, random generators) and its progress, with a
// checksum over all of them, so that a damaged file is refused instead of resumed.
#pragma once

#include <filesystem>

#include "loratune/safetensors.h"

namespace loratune {

constexpr const char* kCheckpointFormat = "loratune.checkpoint/2";

// Writes `tensors` and `metadata` (with "format" and "checksum" added) atomically.
void write_checkpoint(const std::filesystem::path& path, const safetensors::Tensors& tensors,
                      safetensors::Metadata metadata);

// Reads a checkpoint written by write_checkpoint: InputError naming the file when it is not one, or when its
// checksum does not match its contents (damaged, or edited by hand).
safetensors::Contents read_checkpoint(const std::filesystem::path& path);

}  // namespace loratune
