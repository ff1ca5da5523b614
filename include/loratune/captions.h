// Captions beside photos, in the layouts people already have: Hugging Face imagefolder's metadata.jsonl (one JSON
// object per line) or metadata.csv, and a plain CSV or TSV (open_clip's). A row names a photo (the first path column
// of path_columns(), relative to the file's folder or absolute) and gives its caption (a text column; in JSON lines
// also a list of captions). A photo may have several rows. Rows that cannot be used (no such photo, an empty
// caption, text that is not UTF-8, a short row) are skipped, counted and listed.
#pragma once

#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "loratune/image_folder.h"

namespace loratune {

// The columns read as the photo's path, in the order looked for (Hugging Face's, open_clip's, others').
inline const std::vector<std::string>& path_columns() {
  static const std::vector<std::string> names = {"file_name", "filepath", "path", "image"};
  return names;
}
// The columns read as the caption when none is named, in the order looked for.
inline const std::vector<std::string>& caption_columns() {
  static const std::vector<std::string> names = {"text", "caption", "title"};
  return names;
}

struct CaptionFile {
  std::filesystem::path path;
  std::string column;  // the text column read
  // Captions by photo: the photo's absolute, normalised path.
  std::map<std::filesystem::path, std::vector<std::string>> captions;
  SkippedFiles skipped;  // "<file>:<line>", reason

  int64_t caption_count() const;
};

// Reads `file` (.jsonl, .csv, .tsv; other names by their first line). `column`: the text column; empty: the first of
// caption_columns() present. InputError for a file that cannot be read, has no path or text column (naming the
// columns it has) or no usable row.
CaptionFile read_captions(const std::filesystem::path& file, const std::string& column);

// The captions of each photo of `folder`, in its order; photos without any are removed from it and listed in its
// `skipped`. InputError when no photo of the folder has a caption.
std::vector<std::vector<std::string>> attach_captions(ImageFolder& folder, const CaptionFile& captions);

// A photo list from the caption file alone (for retrieval): every photo it names that exists, one pseudo-class.
ImageFolder caption_photos(const CaptionFile& captions);

}  // namespace loratune
