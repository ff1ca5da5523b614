// Files written so that a reader never sees a half-written one: temporary file, then rename.
#pragma once

#include <filesystem>
#include <functional>
#include <string>

namespace loratune {

// Writes `bytes` to `path` atomically.
void write_file_atomic(const std::filesystem::path& path, const std::string& bytes);

// Calls `write(temporary_path)`, then renames the temporary file to `path`. If `write` throws, the temporary file
// is removed and `path` is left as it was.
void write_atomic_with(const std::filesystem::path& path,
                       const std::function<void(const std::filesystem::path&)>& write);

// Replaces directory `path` with a directory filled by `fill(temporary_dir)`, as atomically as the filesystem allows.
void write_directory_atomic(const std::filesystem::path& path,
                            const std::function<void(const std::filesystem::path&)>& fill);

// "~" or "~/..." with the home folder ($HOME) put in; other paths unchanged (the shell does not expand "~" in
// "key=~/photos" or inside JSON files).
std::string expand_home(const std::string& path);

// Whole file as bytes; InputError naming the file if it cannot be read.
std::string read_file(const std::filesystem::path& path);

}  // namespace loratune
