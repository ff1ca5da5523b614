// Files written so that a reader never sees a half-written one: temporary file (flushed to disk), then rename.
// Temporaries are hidden siblings ".<name>.tmp-<pid>" (and ".<name>.old-<pid>" during a directory swap).
#pragma once

#include <filesystem>
#include <functional>
#include <string>

namespace loratune {

// Writes `bytes` to `path` (not atomically) and flushes them to disk; RuntimeFailure (naming the file, and a full
// disk as such) if any part fails.
void write_file_durable(const std::filesystem::path& path, const std::string& bytes);

// Removes a file or a directory tree (symbolic links themselves, not their targets); a missing path is no error.
// Returns false on failure (errno set). Not std::filesystem::remove_all: pip's libtorch.so exports its own build of
// that function, calls bind to it, and it crashed (a null call) under LibTorch 2.11.
bool remove_tree(const std::filesystem::path& path);

// Removes temporaries left in `dir` by writers that no longer run (all, or those of `only_name`). A directory whose
// only copy is a leftover ".old-" sibling (killed between the two renames of a swap) is put back instead.
void remove_stale_temporaries(const std::filesystem::path& dir, const std::string& only_name = "");

// Writes `bytes` to `path` atomically.
void write_file_atomic(const std::filesystem::path& path, const std::string& bytes);

// Calls `write(temporary_path)`, then renames the temporary file to `path`. If `write` throws, the temporary file
// is removed and `path` is left as it was.
void write_atomic_with(const std::filesystem::path& path,
                       const std::function<void(const std::filesystem::path&)>& write);

// Replaces directory `path` with a directory filled by `fill(temporary_dir)`: one atomic exchange where the
// filesystem supports it (Linux renameat2), else two renames.
void write_directory_atomic(const std::filesystem::path& path,
                            const std::function<void(const std::filesystem::path&)>& fill);

// A new folder under the system's temporary folder that only this user can open, removed with its contents when
// the object goes (RuntimeFailure when it cannot be made).
class PrivateFolder {
 public:
  explicit PrivateFolder(const std::string& prefix);
  ~PrivateFolder();
  PrivateFolder(const PrivateFolder&) = delete;
  PrivateFolder& operator=(const PrivateFolder&) = delete;
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
};

// "~" or "~/..." with the home folder ($HOME) put in; other paths unchanged (the shell does not expand "~" in
// "key=~/photos" or inside JSON files).
std::string expand_home(const std::string& path);

// Whole file as bytes; InputError naming the file if it cannot be read (missing, a folder, a symlink loop, ...).
std::string read_file(const std::filesystem::path& path);

}  // namespace loratune
