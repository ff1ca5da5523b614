#include "common/files.h"

#include <fcntl.h>
#include <ftw.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "loratune/errors.h"

namespace fs = std::filesystem;

namespace loratune {
namespace {

constexpr const char* kTemporaryTag = ".tmp-";
constexpr const char* kOldTag = ".old-";

fs::path sibling(const fs::path& path, const char* tag) {
  return path.parent_path() / ("." + path.filename().string() + tag + std::to_string(::getpid()));
}

void ensure_parent(const fs::path& path) {
  if (path.has_parent_path()) fs::create_directories(path.parent_path());
}

[[noreturn]] void fail_io(const std::string& what, const fs::path& path) {
  throw RuntimeFailure("cannot " + what + " " + path.string() + ": " + std::strerror(errno) +
                       (errno == ENOSPC ? " (the disk is full: free some space and run again)" : ""));
}

void fsync_path(const fs::path& path, bool directory) {
  const int fd = ::open(path.c_str(), (directory ? O_DIRECTORY : 0) | O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail_io("open", path);
  const int rc = ::fsync(fd);
  ::close(fd);
  if (rc != 0 && errno != EINVAL) fail_io("flush", path);  // EINVAL: the filesystem cannot sync directories
}

void fsync_parent(const fs::path& path) { fsync_path(path.has_parent_path() ? path.parent_path() : fs::path("."), true); }

void fsync_tree(const fs::path& dir) {
  for (const auto& entry : fs::recursive_directory_iterator(dir))
    fsync_path(entry.path(), entry.is_directory());
  fsync_path(dir, true);
}

// Swaps two paths in one step (Linux renameat2 RENAME_EXCHANGE). False where the filesystem cannot.
bool exchange(const fs::path& a, const fs::path& b) {
#if defined(__linux__) && defined(SYS_renameat2)
  constexpr unsigned kRenameExchange = 1u << 1;
  if (::syscall(SYS_renameat2, AT_FDCWD, a.c_str(), AT_FDCWD, b.c_str(), kRenameExchange) == 0) return true;
#endif
  (void)a, (void)b;
  return false;
}

// "<name>.tmp-<pid>" or "<name>.old-<pid>" after the leading dot: the name and the writer's pid, or {"", 0}.
std::pair<std::string, long> parse_leftover(const std::string& file, const char* tag) {
  if (file.size() < 2 || file[0] != '.') return {"", 0};
  const size_t at = file.rfind(tag);
  if (at == std::string::npos || at < 2) return {"", 0};
  const std::string digits = file.substr(at + std::strlen(tag));
  if (digits.empty() || digits.size() > 9 || digits.find_first_not_of("0123456789") != std::string::npos) return {"", 0};
  return {file.substr(1, at - 1), std::stol(digits)};
}

bool process_alive(long pid) { return pid == ::getpid() || ::kill(static_cast<pid_t>(pid), 0) == 0 || errno == EPERM; }

}  // namespace

void write_file_durable(const fs::path& path, const std::string& bytes) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) fail_io("create", path);
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      const int saved = errno;
      ::close(fd);
      errno = saved;
      fail_io("write", path);
    }
    done += static_cast<size_t>(n);
  }
  if (::fsync(fd) != 0) {
    const int saved = errno;
    ::close(fd);
    errno = saved;
    fail_io("write", path);
  }
  if (::close(fd) != 0) fail_io("write", path);
}

PrivateFolder::PrivateFolder(const std::string& prefix) {
  std::string pattern = (fs::temp_directory_path() / (prefix + "-XXXXXX")).string();
  if (!::mkdtemp(pattern.data()))
    throw RuntimeFailure("cannot make a folder under " + fs::temp_directory_path().string() + " (" +
                         std::strerror(errno) + ")");
  path_ = pattern;
}

PrivateFolder::~PrivateFolder() { remove_tree(path_); }

bool remove_tree(const fs::path& path) {
  auto remove_entry = [](const char* entry, const struct stat*, int, struct FTW*) { return ::remove(entry) == 0 ? 0 : -1; };
  if (::nftw(path.c_str(), remove_entry, 16, FTW_DEPTH | FTW_PHYS) == 0) return true;
  return errno == ENOENT;
}

void remove_stale_temporaries(const fs::path& dir, const std::string& only_name) {
  std::error_code ec;
  std::vector<fs::path> entries;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) entries.push_back(it->path());
  for (const auto& p : entries) {
    const std::string file = p.filename().string();
    for (const char* tag : {kTemporaryTag, kOldTag}) {
      const auto [name, pid] = parse_leftover(file, tag);
      if (name.empty() || (!only_name.empty() && name != only_name) || process_alive(pid)) continue;
      const fs::path target = dir / name;
      // A kill between the two renames of a directory swap left the only copy here: put it back.
      if (std::strcmp(tag, kOldTag) == 0 && !fs::exists(target, ec)) fs::rename(p, target, ec);
      else remove_tree(p);
    }
  }
}

void write_atomic_with(const fs::path& path, const std::function<void(const fs::path&)>& write) {
  ensure_parent(path);
  remove_stale_temporaries(path.has_parent_path() ? path.parent_path() : fs::path("."), path.filename().string());
  const fs::path tmp = sibling(path, kTemporaryTag);
  try {
    write(tmp);
    fsync_path(tmp, false);
    fs::rename(tmp, path);
    fsync_parent(path);
  } catch (...) {
    std::error_code ignored;
    fs::remove(tmp, ignored);
    throw;
  }
}

void write_file_atomic(const fs::path& path, const std::string& bytes) {
  write_atomic_with(path, [&](const fs::path& tmp) { write_file_durable(tmp, bytes); });
}

void write_directory_atomic(const fs::path& path, const std::function<void(const fs::path&)>& fill) {
  ensure_parent(path);
  remove_stale_temporaries(path.has_parent_path() ? path.parent_path() : fs::path("."), path.filename().string());
  const fs::path tmp = sibling(path, kTemporaryTag);
  const fs::path old = sibling(path, kOldTag);
  std::error_code ignored;
  remove_tree(tmp);
  try {
    fs::create_directories(tmp);
    fill(tmp);
    fsync_tree(tmp);
    if (!fs::exists(path)) {
      fs::rename(tmp, path);
    } else if (exchange(tmp, path)) {
      if (!remove_tree(tmp)) fail_io("remove the previous contents of", path);
    } else {
      // No atomic swap here: for a moment only the hidden copy exists (put back by remove_stale_temporaries).
      fs::rename(path, old);
      fs::rename(tmp, path);
      remove_tree(old);
    }
    fsync_parent(path);
  } catch (...) {
    remove_tree(tmp);
    if (!fs::exists(path, ignored) && fs::exists(old, ignored)) fs::rename(old, path, ignored);
    throw;
  }
}

std::string read_file(const fs::path& path) {
  std::error_code ec;
  const auto status = fs::status(path, ec);
  if (ec && ec != std::errc::no_such_file_or_directory)
    throw InputError("cannot open " + path.string() + ": " + ec.message());
  if (!fs::exists(status)) throw InputError("cannot open " + path.string() + ": no such file");
  if (fs::is_directory(status)) throw InputError(path.string() + " is a folder; give a file");
  FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr) throw InputError("cannot open " + path.string() + ": " + std::strerror(errno));
  std::string bytes;
  char buf[1 << 16];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) bytes.append(buf, n);
  const bool failed = std::ferror(f) != 0;
  std::fclose(f);
  if (failed) throw InputError("cannot read " + path.string());
  return bytes;
}

std::string expand_home(const std::string& path) {
  if (path.empty() || path[0] != '~' || (path.size() > 1 && path[1] != '/')) return path;
  const char* home = std::getenv("HOME");
  if (home == nullptr || *home == '\0') return path;
  return std::string(home) + path.substr(1);
}

}  // namespace loratune
