#include "loratune/captions.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <fstream>
#include <optional>
#include <sstream>

#include "common/strings.h"
#include "loratune/errors.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace loratune {

int64_t CaptionFile::caption_count() const {
  int64_t n = 0;
  for (const auto& [photo, texts] : captions) n += static_cast<int64_t>(texts.size());
  return n;
}

namespace {

// One row of the file: its line number, and each column's text (JSON lines: a caption list may give several), or
// why it cannot be read.
struct Row {
  int64_t line = 0;
  std::map<std::string, std::vector<std::string>> fields;
  std::string problem;
};

std::string first_present(const std::vector<std::string>& wanted, const std::vector<std::string>& present) {
  for (const auto& w : wanted)
    if (std::find(present.begin(), present.end(), w) != present.end()) return w;
  return "";
}

std::pair<std::vector<std::string>, std::vector<Row>> read_delimited(const std::string& text, char sep,
                                                                      const fs::path& file) {
  const auto records = parse_delimited(text, sep, file.string());
  if (records.empty()) throw InputError(file.string() + " is empty: it needs a header row and a row per caption");
  std::vector<std::string> header = records.front().fields;
  for (auto& h : header) h = trim(h);
  std::vector<Row> rows;
  for (size_t r = 1; r < records.size(); ++r) {
    Row row{records[r].line, {}, ""};
    const auto& values = records[r].fields;
    for (size_t k = 0; k < header.size() && k < values.size(); ++k) row.fields[header[k]] = {values[k]};
    rows.push_back(std::move(row));
  }
  return {header, rows};
}

std::pair<std::vector<std::string>, std::vector<Row>> read_json_lines(const std::string& text) {
  std::vector<std::string> columns;
  std::vector<Row> rows;
  std::istringstream in(text);
  std::string line;
  for (int64_t n = 1; std::getline(in, line); ++n) {
    if (trim(line).empty()) continue;
    Row row{n, {}, ""};
    json object;
    if (!is_valid_utf8(line)) {
      row.problem = "not UTF-8 (save the file as UTF-8)";
    } else {
      try {
        object = json::parse(line);
      } catch (const json::exception&) {  // stays null: not an object
      }
      if (!object.is_object()) row.problem = "not a JSON object";
    }
    if (!row.problem.empty()) {
      rows.push_back(std::move(row));
      continue;
    }
    for (const auto& [key, value] : object.items()) {
      if (std::find(columns.begin(), columns.end(), key) == columns.end()) columns.push_back(key);
      if (value.is_string()) row.fields[key] = {value.get<std::string>()};
      if (value.is_array())
        for (const auto& item : value)
          if (item.is_string()) row.fields[key].push_back(item.get<std::string>());
    }
    rows.push_back(std::move(row));
  }
  return {columns, rows};
}

std::string read_text(const fs::path& file) {
  std::ifstream in(file, std::ios::binary);
  if (!in) throw InputError("cannot read the caption file " + file.string() + ": check the path (data.captions)");
  std::ostringstream s;
  s << in.rdbuf();
  std::string text = s.str();
  if (text.rfind("\xEF\xBB\xBF", 0) == 0) text.erase(0, 3);  // a byte-order mark (spreadsheet exports)
  return text;
}

// Which layout `file` has: by its extension, else a first line with a tab is TSV, one starting with { JSON lines.
enum class Layout { kJsonLines, kCsv, kTsv };
Layout layout_of(const fs::path& file, const std::string& text) {
  const std::string ext = to_lower(file.extension().string());
  if (ext == ".jsonl" || ext == ".json") return Layout::kJsonLines;
  if (ext == ".tsv") return Layout::kTsv;
  if (ext == ".csv") return Layout::kCsv;
  const std::string first = trim(text.substr(0, text.find('\n')));
  if (!first.empty() && first[0] == '{') return Layout::kJsonLines;
  return first.find('\t') != std::string::npos ? Layout::kTsv : Layout::kCsv;
}

fs::path photo_key(const fs::path& p) { return fs::absolute(p).lexically_normal(); }

}  // namespace

CaptionFile read_captions(const fs::path& file, const std::string& column) {
  CaptionFile out;
  out.path = file;
  const std::string text = read_text(file);
  const Layout layout = layout_of(file, text);
  auto [columns, rows] = layout == Layout::kJsonLines ? read_json_lines(text)
                                                      : read_delimited(text, layout == Layout::kTsv ? '\t' : ',', file);
  const std::string path_column = first_present(path_columns(), columns);
  if (path_column.empty())
    throw InputError(file.string() + " has no photo column (" + join(path_columns(), ", ") + "); its columns: " +
                     join(columns, ", ", 20));
  out.column = column.empty() ? first_present(caption_columns(), columns) : column;
  if (out.column.empty() || std::find(columns.begin(), columns.end(), out.column) == columns.end())
    throw InputError(file.string() + " has no caption column " +
                     (column.empty() ? "(" + join(caption_columns(), ", ") + ")" : "\"" + column + "\"") +
                     "; its columns: " + join(columns, ", ", 20) + "; name one with data.caption_column");

  const fs::path folder = file.parent_path();
  for (const Row& row : rows) {
    const std::string where = file.string() + ":" + std::to_string(row.line);
    if (!row.problem.empty()) {
      out.skipped.emplace_back(where, row.problem);
      continue;
    }
    const auto path = row.fields.find(path_column);
    const auto texts = row.fields.find(out.column);
    if (path == row.fields.end() || path->second.empty() || trim(path->second[0]).empty()) {
      out.skipped.emplace_back(where, "no " + path_column);
      continue;
    }
    const std::string& name = path->second[0];
    if (!is_valid_utf8(name)) {
      out.skipped.emplace_back(where, "the photo's path is not UTF-8");
      continue;
    }
    const fs::path photo = photo_key(fs::path(name).is_absolute() ? fs::path(name) : folder / name);
    std::error_code ec;
    if (!fs::is_regular_file(photo, ec)) {
      out.skipped.emplace_back(where, "no such photo: " + photo.string());
      continue;
    }
    std::vector<std::string> kept;
    std::string why = "no " + out.column;
    if (texts != row.fields.end())
      for (const auto& t : texts->second) {
        if (!is_valid_utf8(t)) why = "the caption is not UTF-8 (save the file as UTF-8)";
        else if (trim(t).empty()) why = "an empty caption";
        else kept.push_back(trim(t));
      }
    if (kept.empty()) {
      out.skipped.emplace_back(where, why);
      continue;
    }
    auto& list = out.captions[photo];
    list.insert(list.end(), kept.begin(), kept.end());
  }
  if (out.captions.empty())
    throw InputError(file.string() + " has no usable caption (" + std::to_string(out.skipped.size()) +
                     " rows skipped" + (out.skipped.empty() ? "" : ", the first: " + out.skipped[0].second) + ")");
  return out;
}

std::vector<std::vector<std::string>> attach_captions(ImageFolder& folder, const CaptionFile& captions) {
  std::vector<std::vector<std::string>> out;
  std::vector<ImageSample> kept;
  for (const ImageSample& sample : folder.samples) {
    const auto found = captions.captions.find(photo_key(sample.path));
    if (found == captions.captions.end()) {
      folder.skipped.emplace_back(sample.path.string(), "no caption in " + captions.path.filename().string());
      continue;
    }
    kept.push_back(sample);
    out.push_back(found->second);
  }
  if (kept.empty())
    throw InputError("no photo of " + folder.root.string() + " has a caption in " + captions.path.string() +
                     ": its paths must name the photos, relative to its folder (" +
                     captions.path.parent_path().string() + ")");
  folder.samples = std::move(kept);
  return out;
}

ImageFolder caption_photos(const CaptionFile& captions) {
  ImageFolder folder;
  folder.root = captions.path.parent_path();
  folder.classes = {"photo"};
  for (const auto& [photo, texts] : captions.captions) {
    if (const std::string why = quick_image_check(photo); !why.empty()) {
      folder.skipped.emplace_back(photo.string(), why);
      continue;
    }
    folder.samples.push_back({photo, 0});
  }
  return folder;
}

}  // namespace loratune
