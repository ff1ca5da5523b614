#include "loratune/image_folder.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <array>
#include <fstream>
#include <map>

#include "loratune/batch_source.h"
#include "loratune/errors.h"
#include "common/strings.h"
#include "data/byte_order.h"

namespace fs = std::filesystem;

namespace loratune {
namespace {

bool is_hidden(const fs::path& p) { return !p.filename().empty() && p.filename().string()[0] == '.'; }

// Images below a class folder, sorted by path; everything else goes to `skipped`.
std::vector<fs::path> images_below(const fs::path& dir, SkippedFiles& skipped) {
  std::vector<fs::path> files;
  std::error_code ec;
  for (fs::recursive_directory_iterator it(dir, fs::directory_options::skip_permission_denied, ec), end; it != end;
       it.increment(ec)) {
    if (ec) break;
    if (!it->is_regular_file(ec)) continue;
    files.push_back(it->path());
  }
  std::sort(files.begin(), files.end());
  std::vector<fs::path> out;
  const auto& ext = image_extensions();
  for (const auto& f : files) {
    if (!is_valid_utf8(f.string())) {
      skipped.push_back({escape_invalid_utf8(f.string()), "file name is not valid UTF-8 (rename it, e.g. with convmv)"});
      continue;
    }
    if (std::find(ext.begin(), ext.end(), to_lower(f.extension().string())) == ext.end()) {
      skipped.push_back({f.string(), is_hidden(f) ? "hidden file" : "not an image (extension " + f.extension().string() + ")"});
      continue;
    }
    const std::string problem = quick_image_check(f);
    if (!problem.empty()) skipped.push_back({f.string(), problem});
    else out.push_back(f);
  }
  return out;
}

std::vector<std::string> class_dirs(const fs::path& root) {
  std::error_code ec;
  const auto status = fs::status(root, ec);
  if (ec && ec != std::errc::no_such_file_or_directory)
    throw InputError("photo folder " + escape_invalid_utf8(root.string()) + ": " + ec.message());
  if (!fs::exists(status)) throw InputError("photo folder " + escape_invalid_utf8(root.string()) + " does not exist");
  if (!fs::is_directory(status))
    throw InputError(escape_invalid_utf8(root.string()) + " is not a folder; give the folder that holds one subfolder per class");
  std::vector<std::string> names;
  for (fs::directory_iterator it(root, ec), end; !ec && it != end; it.increment(ec))
    if (it->is_directory(ec) && !is_hidden(it->path())) names.push_back(it->path().filename().string());
  if (ec) throw InputError("cannot list " + escape_invalid_utf8(root.string()) + ": " + ec.message());
  std::sort(names.begin(), names.end());
  for (const auto& n : names)
    if (!is_valid_utf8(n))
      throw InputError("class folder name \"" + escape_invalid_utf8(n) + "\" in " + escape_invalid_utf8(root.string()) +
                       " is not valid UTF-8 (an old encoding such as CP949 or Latin-1?); rename it, e.g. with "
                       "convmv -f cp949 -t utf-8 --notest");
  return names;
}

}  // namespace

const std::vector<std::string>& image_extensions() {
  static const std::vector<std::string> ext = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"};
  return ext;
}

std::vector<int64_t> ImageFolder::class_counts() const {
  std::vector<int64_t> counts(classes.size(), 0);
  for (const auto& s : samples) ++counts[static_cast<size_t>(s.label)];
  return counts;
}

std::string quick_image_check(const fs::path& path) {
  std::error_code ec;
  const auto size = fs::file_size(path, ec);
  if (ec) return "cannot read file size";
  if (size == 0) return "empty file (0 bytes)";
  std::ifstream in(path, std::ios::binary);
  if (!in) return "cannot open (permission denied?)";
  std::array<unsigned char, 16> head{};
  in.read(reinterpret_cast<char*>(head.data()), head.size());
  const auto got = static_cast<size_t>(in.gcount());
  std::array<unsigned char, 64> tail{};
  const size_t tail_len = std::min<size_t>(tail.size(), size);
  in.clear();
  in.seekg(static_cast<std::streamoff>(size - tail_len));
  in.read(reinterpret_cast<char*>(tail.data()), static_cast<std::streamsize>(tail_len));
  auto tail_has = [&](std::initializer_list<unsigned char> marker) {
    const std::vector<unsigned char> m(marker);
    return std::search(tail.begin(), tail.begin() + tail_len, m.begin(), m.end()) != tail.begin() + tail_len;
  };
  if (got >= 3 && head[0] == 0xff && head[1] == 0xd8 && head[2] == 0xff)
    return tail_has({0xff, 0xd9}) ? "" : "truncated JPEG (no end-of-image marker)";
  if (got >= 8 && std::equal(head.begin(), head.begin() + 8, std::array<unsigned char, 8>{0x89, 'P', 'N', 'G', 0x0d, 0x0a, 0x1a, 0x0a}.begin()))
    return tail_has({'I', 'E', 'N', 'D'}) ? "" : "truncated PNG (no IEND chunk)";
  if (got >= 6 && head[0] == 'B' && head[1] == 'M')
    return read_le32(&head[2]) <= size ? "" : "truncated BMP (shorter than its header says)";
  if (got >= 12 && std::equal(head.begin(), head.begin() + 4, "RIFF") && std::equal(head.begin() + 8, head.begin() + 12, "WEBP"))
    return static_cast<uint64_t>(read_le32(&head[4])) + 8 <= size ? "" : "truncated WebP (shorter than its header says)";
  if (got >= 4 && ((head[0] == 'I' && head[1] == 'I' && head[2] == 42 && head[3] == 0) ||
                   (head[0] == 'M' && head[1] == 'M' && head[2] == 0 && head[3] == 42)))
    return "";
  return "not a JPEG, PNG, BMP, WebP or TIFF image (contents do not match)";
}

ImageFolder scan_image_folder(const fs::path& root) {
  ImageFolder f;
  f.root = root;
  const auto names = class_dirs(root);
  if (names.size() < 2)
    throw InputError(root.string() + " has " + std::to_string(names.size()) + " class folder" + (names.size() == 1 ? "" : "s") +
                     "; a classifier needs at least two: put each class's photos in its own subfolder, e.g. " +
                     (root / "cats").string() + " and " + (root / "dogs").string());
  std::vector<std::string> empty;
  for (const auto& name : names) {
    const auto images = images_below(root / name, f.skipped);
    if (images.empty()) empty.push_back(name);
    const auto label = static_cast<int64_t>(f.classes.size());
    for (const auto& p : images) f.samples.push_back({p, label});
    f.classes.push_back(name);
  }
  if (!empty.empty())
    throw InputError("class folder" + std::string(empty.size() > 1 ? "s " : " ") + join(empty, ", ") + " in " + root.string() +
                     " ha" + (empty.size() > 1 ? "ve" : "s") + " no usable images (" + std::to_string(f.skipped.size()) +
                     " files skipped); add images or remove the folder");
  return f;
}

ImageFolder scan_image_folder_for(const fs::path& root, const std::vector<std::string>& classes) {
  ImageFolder f;
  f.root = root;
  f.classes = classes;
  const auto names = class_dirs(root);
  std::vector<std::string> unknown;
  for (const auto& n : names)
    if (std::find(classes.begin(), classes.end(), n) == classes.end()) unknown.push_back(n);
  if (!unknown.empty())
    throw InputError(root.string() + " has class folders the model does not know: " + join(unknown, ", ", 20) +
                     " (known: " + join(classes, ", ", 20) + ")");
  for (size_t label = 0; label < classes.size(); ++label) {
    if (!fs::is_directory(root / classes[label])) continue;
    for (const auto& p : images_below(root / classes[label], f.skipped)) f.samples.push_back({p, static_cast<int64_t>(label)});
  }
  if (f.samples.empty()) throw InputError(root.string() + " has no usable images");
  return f;
}

std::pair<ImageFolder, ImageFolder> stratified_split(const ImageFolder& folder, double fraction, uint64_t seed) {
  ImageFolder train, val;
  train.root = val.root = folder.root;
  train.classes = val.classes = folder.classes;
  train.skipped = folder.skipped;
  std::map<int64_t, std::vector<ImageSample>> by_class;
  for (const auto& s : folder.samples) by_class[s.label].push_back(s);
  for (auto& [label, samples] : by_class) {
    const auto order = epoch_order(static_cast<int64_t>(samples.size()), seed, label);
    auto held = static_cast<size_t>(std::llround(fraction * static_cast<double>(samples.size())));
    if (samples.size() >= 2) held = std::clamp<size_t>(held, 1, samples.size() - 1);
    else held = 0;
    for (size_t i = 0; i < samples.size(); ++i) (i < held ? val : train).samples.push_back(samples[order[i]]);
  }
  return {train, val};
}

std::vector<std::string> describe_skipped(const SkippedFiles& skipped, const std::string& what) {
  if (skipped.empty()) return {};
  std::vector<std::string> lines = {fmt::format("{}: skipped {} file{}:", what, skipped.size(), skipped.size() == 1 ? "" : "s")};
  const size_t shown = std::min<size_t>(skipped.size(), 10);
  for (size_t i = 0; i < shown; ++i) lines.push_back(fmt::format("  {}: {}", skipped[i].first, skipped[i].second));
  if (shown < skipped.size()) lines.push_back(fmt::format("  ... and {} more (all listed in summary.json)", skipped.size() - shown));
  return lines;
}

void log_skipped(const SkippedFiles& skipped, const std::string& what) {
  for (const auto& line : describe_skipped(skipped, what)) spdlog::warn("{}", line);
}

}  // namespace loratune
