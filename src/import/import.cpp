// Checkpoint sources (folders, hub ids in the local cache), their weights and configs, and the family dispatch.
#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <set>

#include "common/files.h"
#include "common/strings.h"
#include "import/families.h"
#include "loratune/errors.h"
#include "loratune/safetensors.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace loratune {
namespace {

constexpr const char* kTextSuffix = "#text";

bool ends_with(const std::string& s, const std::string& tail) {
  return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
}

// The hub cache as huggingface_hub finds it.
fs::path hub_cache() {
  if (const char* c = std::getenv("HF_HUB_CACHE"); c && *c) return expand_home(c);
  if (const char* c = std::getenv("HUGGINGFACE_HUB_CACHE"); c && *c) return expand_home(c);
  if (const char* h = std::getenv("HF_HOME"); h && *h) return fs::path(expand_home(h)) / "hub";
  if (const char* x = std::getenv("XDG_CACHE_HOME"); x && *x) return fs::path(x) / "huggingface" / "hub";
  return fs::path(expand_home("~/.cache")) / "huggingface" / "hub";
}

std::string strip_tower(const std::string& source, Tower* tower) {
  if (ends_with(source, kTextSuffix)) {
    if (tower) *tower = Tower::text;
    return source.substr(0, source.size() - std::string(kTextSuffix).size());
  }
  return source;
}

importer::Folder folder_of(const std::string& source) {
  importer::Folder f;
  f.display = source;
  f.dir = resolve_checkpoint_folder(source);
  if (source.rfind("hf:", 0) == 0) {
    const std::string id = source.substr(3);
    f.name = id.substr(0, id.find('@'));
  } else {
    f.name = fs::absolute(f.dir).lexically_normal().filename().string();
    if (f.name.empty()) f.name = fs::absolute(f.dir).lexically_normal().parent_path().filename().string();
  }
  return f;
}

}  // namespace

bool is_checkpoint_source(const std::string& source) {
  const std::string s = strip_tower(source, nullptr);
  if (s.rfind("hf:", 0) == 0) return true;
  std::error_code ec;
  return fs::is_regular_file(fs::path(s) / "config.json", ec) || fs::is_regular_file(fs::path(s) / "open_clip_config.json", ec);
}

namespace {

bool is_hex_commit(const std::string& s) {
  return s.size() == 40 && std::all_of(s.begin(), s.end(), [](char c) { return std::isxdigit(static_cast<unsigned char>(c)); });
}

// A part of a hub id or a revision name as the hub allows them: letters, digits, '-', '_', '.', not starting or ending
// with '-' or '.', no "--" or "..", at most `max` characters.
bool is_hub_name(const std::string& s, size_t max) {
  if (s.empty() || s.size() > max || s.find("--") != std::string::npos || s.find("..") != std::string::npos) return false;
  for (char c : {s.front(), s.back()})
    if (c == '-' || c == '.') return false;
  return std::all_of(s.begin(), s.end(), [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.';
  });
}

}  // namespace

fs::path resolve_checkpoint_folder(const std::string& source_with_tower) {
  const std::string source = strip_tower(source_with_tower, nullptr);
  if (source.rfind("hf:", 0) != 0) {
    std::error_code ec;
    if (!fs::is_directory(source, ec)) throw InputError("checkpoint folder " + printable(source) + " does not exist");
    return source;
  }
  std::string id = source.substr(3), revision = "main";
  if (const size_t at = id.find('@'); at != std::string::npos) revision = id.substr(at + 1), id = id.substr(0, at);
  const size_t slash = id.find('/');
  const std::string org = slash == std::string::npos ? "" : id.substr(0, slash);
  const std::string name = slash == std::string::npos ? id : id.substr(slash + 1);
  if ((slash != std::string::npos && !is_hub_name(org, 96)) || !is_hub_name(name, 96) ||
      !(is_hub_name(revision, 128) || is_hex_commit(revision)))
    throw InputError("\"" + printable(source) + "\" is not a hub id: write hf:ORG/NAME or hf:ORG/NAME@REVISION (letters, "
                     "digits, '-', '_', '.'; a revision is a branch, a tag or a 40-digit commit)");
  const fs::path cache = hub_cache();
  const fs::path repo = cache / ("models--" + (org.empty() ? name : org + "--" + name));
  const std::string fetch = "hf download " + id + (revision == "main" ? "" : " --revision " + revision);
  std::error_code ec;
  std::string commit = revision;  // a commit hash given directly
  if (fs::is_regular_file(repo / "refs" / revision, ec)) {
    if (fs::file_size(repo / "refs" / revision, ec) > 4096)
      throw InputError((repo / "refs" / revision).string() + ": not a hub cache ref (over 4 KiB)");
    commit = read_file(repo / "refs" / revision);
    while (!commit.empty() && std::isspace(static_cast<unsigned char>(commit.back()))) commit.pop_back();
    if (!is_hex_commit(commit))
      throw InputError((repo / "refs" / revision).string() + ": the hub cache's ref of " + id + "@" + revision +
                       " must hold a 40-digit commit hash, not \"" + printable(commit.substr(0, 80)) + "\"");
  } else if (!is_hex_commit(revision)) {
    commit.clear();
  }
  const fs::path snapshots = repo / "snapshots", snapshot = snapshots / commit;
  if (commit.empty() || !fs::is_directory(snapshot, ec))
    throw InputError(id + (revision == "main" ? "" : "@" + revision) + " is not in the local Hugging Face cache (" +
                     printable(cache.string()) + "); loratune does not download: fetch it with `" + fetch +
                     "`, or pass the folder");
  // The snapshot folder itself must be in the repository's snapshots/ (its files may link into blobs/).
  const fs::path real = fs::canonical(snapshot, ec), real_snapshots = fs::canonical(snapshots, ec);
  if (ec || real.parent_path() != real_snapshots)
    throw InputError(snapshot.string() + ": the hub cache's snapshot of " + id + " leads outside " +
                     snapshots.string() + "; not loaded");
  return snapshot;
}

namespace importer {

const char* const kTransformersTypes = "vit, deit, dinov2, dinov2_with_registers, clip, clip_vision_model, siglip, "
                                       "siglip_vision_model";

bool Folder::has(const std::string& n) const {
  std::error_code ec;
  return fs::is_regular_file(dir / n, ec);
}

json Folder::json_file(const std::string& n) const {
  const fs::path p = dir / n;
  std::string text;
  try {
    text = read_file(p);
  } catch (const std::exception& e) {
    throw InputError(p.string() + ": cannot be read (" + e.what() + ")");
  }
  try {
    json j = json::parse(text);
    if (!j.is_object()) throw InputError(p.string() + ": expected a JSON object");
    return j;
  } catch (const json::exception& e) {
    throw InputError(p.string() + ": not valid JSON (" + std::string(e.what()) + ")");
  }
}

CheckpointTensors read_weights(const Folder& folder, const std::string& stem, const std::string& bin_name) {
  const std::string single = stem + ".safetensors", index = stem + ".safetensors.index.json";
  std::map<std::string, at::Tensor> tensors;
  if (folder.has(single)) {
    tensors = safetensors::read(folder.file(single)).tensors;
    return CheckpointTensors(std::move(tensors), folder.where(single));
  }
  if (folder.has(index)) {
    const json j = folder.json_file(index);
    if (!j.contains("weight_map") || !j["weight_map"].is_object())
      throw InputError(folder.where(index) + ": no \"weight_map\" object");
    std::set<std::string> shards;
    for (const auto& [key, file] : j["weight_map"].items()) {
      if (!file.is_string()) throw InputError(folder.where(index) + ": weight_map[\"" + key + "\"] is not a file name");
      const std::string f = file.get<std::string>();
      if (f.find('/') != std::string::npos || f.find("..") != std::string::npos)
        throw InputError(folder.where(index) + ": shard \"" + f + "\" is not a file of the folder");
      shards.insert(f);
    }
    for (const auto& shard : shards) {
      if (!folder.has(shard)) throw InputError(folder.where(shard) + ": shard listed in " + index + " is missing");
      for (auto& [k, t] : safetensors::read(folder.file(shard)).tensors)
        if (!tensors.emplace(k, std::move(t)).second)
          throw InputError(folder.where(shard) + ": tensor \"" + k + "\" is in two shards");
    }
    return CheckpointTensors(std::move(tensors), folder.where(index));
  }
  for (const std::string& pickled : {bin_name, stem + ".pth", stem + ".bin"})
    if (folder.has(pickled))
      throw InputError(folder.where(pickled) + ": pickled weights are not read (unpickling can run code); convert "
                       "them to " + single + " where they came from (the hub usually has a safetensors revision: " +
                       "`hf download ORG/NAME --include '*.safetensors'`)");
  throw InputError(folder.dir.string() + ": no " + single + " (nor " + index + ")");
}

int64_t config_int(const json& j, const std::string& key, const std::string& where, std::optional<int64_t> fallback) {
  if (!j.contains(key) || j[key].is_null()) {
    if (fallback) return *fallback;
    throw InputError(where + ": \"" + key + "\" is missing");
  }
  if (!j[key].is_number_integer() || j[key].get<int64_t>() < 0 || j[key].get<int64_t>() > (int64_t{1} << 24))
    throw InputError(where + ": \"" + key + "\" must be an integer from 0 to 2^24, not " + j[key].dump());
  return j[key].get<int64_t>();
}

int64_t config_size(const json& j, const std::string& key, const std::string& where, std::optional<int64_t> fallback,
                    int64_t max) {
  const int64_t v = config_int(j, key, where, fallback);
  if (v < 1 || v > max)
    throw InputError(where + ": \"" + key + "\" must be from 1 to " + std::to_string(max) + ", not " + std::to_string(v));
  return v;
}

double config_number(const json& j, const std::string& key, const std::string& where, std::optional<double> fallback,
                     double low, double high) {
  if (!j.contains(key) || j[key].is_null()) {
    if (fallback) return *fallback;
    throw InputError(where + ": \"" + key + "\" is missing");
  }
  if (!j[key].is_number()) throw InputError(where + ": \"" + key + "\" must be a number, not " + printable(j[key].dump()));
  const double v = j[key].get<double>();
  if (!(v > low && v <= high))
    throw InputError(where + ": \"" + key + "\" must be in (" + float_literal(low) + ", " + float_literal(high) + "], not " +
                     j[key].dump());
  return v;
}

std::string config_string(const json& j, const std::string& key, const std::string& where,
                          std::optional<std::string> fallback) {
  if (!j.contains(key) || j[key].is_null()) {
    if (fallback) return *fallback;
    throw InputError(where + ": \"" + key + "\" is missing");
  }
  if (!j[key].is_string()) throw InputError(where + ": \"" + key + "\" must be a string, not " + j[key].dump());
  return j[key].get<std::string>();
}

void Preprocessing::write(json& m) const {
  m["image_size"] = image_size;
  m["resize_size"] = std::max(resize_size, image_size);
  m["interpolation"] = interpolation;
  m["mean"] = mean;
  m["std"] = std;
}

json image_metadata(const std::string& architecture, const Folder& folder, int64_t feature_dim,
                    const std::string& blocks, const std::string& module_prefix, const Preprocessing& pre) {
  json m = {{"format", 1},
            {"kind", "backbone"},
            {"family", "vit"},
            {"architecture", architecture},
            {"name", folder.name + " (imported)"},
            {"feature_dim", feature_dim},
            {"blocks", blocks},
            {"module_prefix", module_prefix}};
  pre.write(m);
  return m;
}

}  // namespace importer

namespace {

ImportedModel build_checkpoint(const std::string& source, Tower tower, const ImportOptions& options) {
  const importer::Folder folder = folder_of(source);
  ImportedModel out;
  if (folder.has("open_clip_config.json")) {
    out = importer::import_open_clip(folder, folder.json_file("open_clip_config.json"), tower, options);
  } else if (folder.has("config.json")) {
    const json config = folder.json_file("config.json");
    if (config.contains("architecture") && config.contains("pretrained_cfg")) {
      if (tower == Tower::text) throw InputError(folder.dir.string() + ": a timm model has no text tower");
      out = importer::import_timm(folder, config, options);
    } else if (config.contains("model_type")) {
      out = importer::import_transformers(folder, config, tower, options);
    } else {
      throw InputError(folder.where("config.json") + ": neither a transformers config (model_type) nor a timm one "
                       "(architecture, pretrained_cfg). Supported: " + supported_checkpoint_families());
    }
  } else {
    throw InputError(folder.dir.string() + ": no config.json or open_clip_config.json; not a checkpoint folder loratune "
                     "imports. Supported: " + supported_checkpoint_families());
  }
  if (tower == Tower::image && has_text_tower(source))
    out.metadata["text_model"] = text_tower_source(fs::absolute(folder.dir).lexically_normal().string());
  return out;
}

}  // namespace

ImportedModel import_checkpoint(const std::string& source_with_tower, Tower tower, const ImportOptions& options) {
  const std::string source = strip_tower(source_with_tower, &tower);
  // Values the checks above let through but LibTorch or the JSON reader still refuse are the folder's fault too.
  try {
    return build_checkpoint(source, tower, options);
  } catch (const c10::Error& e) {
    const std::string what = e.what_without_backtrace();
    throw InputError(printable(source) + ": the checkpoint does not build (" + printable(what.substr(0, what.find('\n'))) + ")");
  } catch (const json::exception& e) {
    throw InputError(printable(source) + ": a config value has the wrong type (" + printable(e.what()) + ")");
  }
}

std::string text_tower_source(const std::string& source) {
  return ends_with(source, kTextSuffix) ? source : source + kTextSuffix;
}

bool has_text_tower(const std::string& source_with_tower) {
  const std::string source = strip_tower(source_with_tower, nullptr);
  const importer::Folder folder = folder_of(source);
  if (folder.has("open_clip_config.json")) return true;
  if (!folder.has("config.json")) return false;
  const json config = folder.json_file("config.json");
  const std::string type = config.value("model_type", "");
  return (type == "clip" && folder.has("merges.txt")) || (type == "siglip" && folder.has("spiece.model"));
}

std::string supported_checkpoint_families() {
  return std::string("transformers (config.json with model_type ") + importer::kTransformersTypes +
         "); timm VisionTransformer models (config.json with architecture and pretrained_cfg); open_clip ViT CLIPs "
         "(open_clip_config.json)";
}

}  // namespace loratune
