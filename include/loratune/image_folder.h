// Photo folders: <root>/<class name>/... with images at any depth below each class folder.
// Class names are kept exactly as the folder names (UTF-8, any language) and sorted.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <utility>
#include <vector>

namespace loratune {

struct ImageSample {
  std::filesystem::path path;
  int64_t label = 0;
};

using SkippedFiles = std::vector<std::pair<std::string, std::string>>;  // path, reason

struct ImageFolder {
  std::filesystem::path root;
  std::vector<std::string> classes;
  std::vector<ImageSample> samples;
  SkippedFiles skipped;  // unreadable, empty, truncated or non-image files

  std::vector<int64_t> class_counts() const;
};

// File extensions read as images (lower case).
const std::vector<std::string>& image_extensions();

// Checks a file's size, signature and (for JPEG/PNG/BMP/WebP) its end without decoding it.
// Returns "" when it looks like a complete image, else the reason to skip it.
std::string quick_image_check(const std::filesystem::path& path);

// Scans `root`. InputError when it is not a folder, has fewer than two class folders, or a class has no usable image.
ImageFolder scan_image_folder(const std::filesystem::path& root);

// Scans a held-out folder against known classes: folders of unknown classes are an error that lists them; known
// classes without images are allowed (reported by the caller). Labels follow `classes`.
ImageFolder scan_image_folder_for(const std::filesystem::path& root, const std::vector<std::string>& classes);

// Holds out `fraction` of each class (at least one image of classes that have two or more), seeded.
std::pair<ImageFolder, ImageFolder> stratified_split(const ImageFolder& folder, double fraction, uint64_t seed);

// A short list of skipped files: count, then the first few with reasons (no lines when nothing was skipped).
std::vector<std::string> describe_skipped(const SkippedFiles& skipped, const std::string& what);
// The same lines as warnings in the log.
void log_skipped(const SkippedFiles& skipped, const std::string& what);

}  // namespace loratune
