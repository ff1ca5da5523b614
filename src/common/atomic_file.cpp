#include "loratune/files.h"

#include <cstdlib>
#include <fstream>
#include <unistd.h>

#include "loratune/errors.h"

namespace fs = std::filesystem;

namespace loratune {
namespace {

fs::path temporary_sibling(const fs::path& path) {
  return path.parent_path() / ("." + path.filename().string() + ".tmp-" + std::to_string(::getpid()));
}

void ensure_parent(const fs::path& path) {
  if (path.has_parent_path()) fs::create_directories(path.parent_path());
}

}  // namespace

void write_atomic_with(const fs::path& path, const std::function<void(const fs::path&)>& write) {
  ensure_parent(path);
  const fs::path tmp = temporary_sibling(path);
  try {
    write(tmp);
    fs::rename(tmp, path);
  } catch (...) {
    std::error_code ignored;
    fs::remove(tmp, ignored);
    throw;
  }
}

void write_file_atomic(const fs::path& path, const std::string& bytes) {
  write_atomic_with(path, [&](const fs::path& tmp) {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    out.flush();
    if (!out) throw RuntimeFailure("cannot write " + tmp.string() + " (disk full or no permission?)");
  });
}

void write_directory_atomic(const fs::path& path, const std::function<void(const fs::path&)>& fill) {
  ensure_parent(path);
  const fs::path tmp = temporary_sibling(path);
  const fs::path old = path.parent_path() / ("." + path.filename().string() + ".old-" + std::to_string(::getpid()));
  std::error_code ignored;
  fs::remove_all(tmp, ignored);
  try {
    fs::create_directories(tmp);
    fill(tmp);
    if (fs::exists(path)) fs::rename(path, old);
    fs::rename(tmp, path);
    fs::remove_all(old, ignored);
  } catch (...) {
    fs::remove_all(tmp, ignored);
    if (!fs::exists(path) && fs::exists(old)) fs::rename(old, path, ignored);
    throw;
  }
}

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw InputError("cannot open " + path.string() + ": " + (fs::exists(path) ? "permission denied" : "no such file"));
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) throw InputError("cannot read " + path.string());
  return bytes;
}

std::string expand_home(const std::string& path) {
  if (path.empty() || path[0] != '~' || (path.size() > 1 && path[1] != '/')) return path;
  const char* home = std::getenv("HOME");
  if (home == nullptr || *home == '\0') return path;
  return std::string(home) + path.substr(1);
}

}  // namespace loratune
