#include "loratune/bundle.h"

#include <torch/csrc/jit/runtime/graph_executor.h>
#include <torch/csrc/jit/serialization/import.h>

#include <algorithm>
#include <fstream>
#include <map>
#include <cmath>
#include <set>

#include "common/torch_compat.h"
#include "loratune/errors.h"
#include "loratune/import.h"
#include "common/files.h"
#include "common/fingerprint.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace loratune {
namespace {

template <typename T>
T metadata_field(const json& j, const char* key, const T& fallback, const std::string& origin) {
  if (!j.contains(key)) return fallback;
  try {
    return j.at(key).get<T>();
  } catch (const json::exception&) {
    throw InputError(origin + ": metadata field \"" + key + "\" has the wrong type (" + j.at(key).dump() + ")");
  }
}

// Beyond any vision encoder there is (the largest have 6144-d features): larger values in a bundle's metadata are
// damage or hostility, and would size huge allocations.
constexpr int64_t kMaxFeatureDim = 65536;

const std::set<std::string> kKnownFields = {"format", "kind", "family", "architecture", "name", "feature_dim",
                                            "image_size", "resize_size", "interpolation", "mean", "std", "blocks",
                                            "module_prefix", "classes"};

}  // namespace

json BundleInfo::to_json() const {
  json j = extra;
  j["format"] = kBundleFormatVersion;
  j["kind"] = kind;
  j["family"] = family;
  j["architecture"] = architecture;
  j["name"] = name;
  j["feature_dim"] = feature_dim;
  if (kind != "text_encoder") {  // a text tower takes token ids: no image preprocessing
    j["image_size"] = image_size;
    j["resize_size"] = resize_size;
    j["interpolation"] = interpolation;
    j["mean"] = mean;
    j["std"] = std;
  }
  j["blocks"] = blocks;
  j["module_prefix"] = module_prefix;
  if (!classes.empty()) j["classes"] = classes;
  return j;
}

BundleInfo BundleInfo::from_json(const json& j, const std::string& origin) {
  if (!j.is_object()) throw InputError(origin + ": bundle metadata is not a JSON object");
  const int format = metadata_field<int>(j, "format", 0, origin);
  if (format != kBundleFormatVersion)
    throw InputError(origin + ": bundle metadata format " + std::to_string(format) + " is not supported (expected " +
                     std::to_string(kBundleFormatVersion) + "); re-export the model with scripts/export/");
  BundleInfo info;
  info.kind = metadata_field<std::string>(j, "kind", info.kind, origin);
  info.family = metadata_field<std::string>(j, "family", "", origin);
  info.architecture = metadata_field<std::string>(j, "architecture", "", origin);
  info.name = metadata_field<std::string>(j, "name", "", origin);
  info.feature_dim = metadata_field<int64_t>(j, "feature_dim", 0, origin);
  info.image_size = metadata_field<int64_t>(j, "image_size", info.image_size, origin);
  info.resize_size = metadata_field<int64_t>(j, "resize_size", info.resize_size, origin);
  info.interpolation = metadata_field<std::string>(j, "interpolation", info.interpolation, origin);
  info.mean = metadata_field<std::array<float, 3>>(j, "mean", info.mean, origin);
  info.std = metadata_field<std::array<float, 3>>(j, "std", info.std, origin);
  info.blocks = metadata_field<std::string>(j, "blocks", "", origin);
  info.module_prefix = metadata_field<std::string>(j, "module_prefix", "", origin);
  info.classes = metadata_field<std::vector<std::string>>(j, "classes", {}, origin);
  if (info.kind != "backbone" && info.kind != "classifier" && info.kind != "text_encoder")
    throw InputError(origin + ": metadata kind must be \"backbone\", \"classifier\" or \"text_encoder\", not \"" +
                     info.kind + "\"");
  if (info.feature_dim <= 0 || info.feature_dim > kMaxFeatureDim)
    throw InputError(origin + ": metadata feature_dim must be from 1 to " + std::to_string(kMaxFeatureDim) + " (got " +
                     std::to_string(info.feature_dim) + ")");
  for (const auto& [key, value] : j.items())
    if (!kKnownFields.count(key)) info.extra[key] = value;
  if (info.kind == "text_encoder") return info;
  if (info.image_size <= 0 || info.resize_size < info.image_size || info.resize_size > kMaxBundleImageSize)
    throw InputError(origin + ": metadata needs 0 < image_size <= resize_size <= " + std::to_string(kMaxBundleImageSize) +
                     " (got " + std::to_string(info.image_size) + ", " + std::to_string(info.resize_size) + ")");
  const std::set<std::string> interpolations = {"bilinear", "bicubic", "nearest", "area"};
  if (!interpolations.count(info.interpolation))
    throw InputError(origin + ": metadata interpolation \"" + info.interpolation +
                     "\" is not one of bilinear, bicubic, nearest, area");
  for (float s : info.std)
    if (!(s > 0) || !std::isfinite(s)) throw InputError(origin + ": metadata std values must be positive and finite");
  for (float m : info.mean)
    if (!std::isfinite(m)) throw InputError(origin + ": metadata mean values must be finite");
  return info;
}

torch::jit::Module submodule_at(const torch::jit::Module& root, const std::string& path) {
  torch::jit::Module m = root;
  if (path.empty()) return m;
  size_t start = 0;
  while (start <= path.size()) {
    const size_t dot = path.find('.', start);
    const std::string part = path.substr(start, dot == std::string::npos ? std::string::npos : dot - start);
    if (!m.hasattr(part) || !m.attr(part).isModule())
      throw InputError("the model has no module \"" + path + "\" (no \"" + part + "\" inside it)");
    m = m.attr(part).toModule();
    if (dot == std::string::npos) break;
    start = dot + 1;
  }
  return m;
}

bool Bundle::has_block_structure() const {
  return !info.blocks.empty() && module.find_method("stem").has_value() && module.find_method("head").has_value();
}

torch::jit::Module Bundle::blocks_module() const { return submodule_at(module, info.blocks); }

std::vector<torch::jit::Module> Bundle::blocks() const {
  std::vector<torch::jit::Module> out;
  for (const auto& child : blocks_module().children()) out.push_back(child);
  return out;
}

void check_trainable_graph(const torch::jit::Module& module, const std::string& origin) {
  std::set<const c10::ClassType*> seen;
  for (const auto& m : module.modules()) {
    if (!seen.insert(m.type().get()).second) continue;
    for (const auto& method : m.get_methods()) {
      // Only ops on the top level of a graph always run; scripted models keep such fast paths inside branches.
      for (const torch::jit::Node* node : compat::method_graph(method.function()).get()->nodes())
        if (node->kind() == c10::Symbol::fromQualString("aten::_native_multi_head_attention"))
          throw InputError(origin + ": the model runs aten::_native_multi_head_attention, which has no backward "
                           "(it was traced under torch.no_grad() or inference mode). Re-export it with gradients "
                           "enabled: torch.jit.trace outside no_grad, e.g. scripts/export/torchvision_vit.py");
    }
  }
}

namespace {

uint64_t le(const std::string& b, size_t at, int bytes) {
  uint64_t v = 0;
  for (int i = bytes - 1; i >= 0; --i) v = (v << 8) | static_cast<unsigned char>(b[at + static_cast<size_t>(i)]);
  return v;
}

// Sizes of the tensor data records ("<archive>/data/<key>") from the zip central directory (zip64 included); empty
// when the directory cannot be read (then torch::jit::load has judged the file already).
std::vector<uint64_t> data_record_sizes(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  in.seekg(0, std::ios::end);
  const auto file_size = static_cast<uint64_t>(in.tellg());
  const uint64_t tail_len = std::min<uint64_t>(file_size, 65557);
  std::string tail(tail_len, '\0');
  in.seekg(static_cast<std::streamoff>(file_size - tail_len));
  in.read(tail.data(), static_cast<std::streamsize>(tail_len));
  const size_t eocd = tail.rfind(std::string("PK\x05\x06", 4));
  if (!in || eocd == std::string::npos || eocd + 22 > tail.size()) return {};
  uint64_t entries = le(tail, eocd + 10, 2), cd_size = le(tail, eocd + 12, 4), cd_offset = le(tail, eocd + 16, 4);
  if ((entries == 0xffff || cd_size == 0xffffffff || cd_offset == 0xffffffff) && eocd >= 20 &&
      tail.compare(eocd - 20, 4, std::string("PK\x06\x07", 4)) == 0) {
    std::string z64(56, '\0');
    in.seekg(static_cast<std::streamoff>(le(tail, eocd - 20 + 8, 8)));
    in.read(z64.data(), 56);
    if (!in || z64.compare(0, 4, std::string("PK\x06\x06", 4)) != 0) return {};
    entries = le(z64, 32, 8), cd_size = le(z64, 40, 8), cd_offset = le(z64, 48, 8);
  }
  if (cd_offset > file_size || cd_size > file_size - cd_offset || cd_size > (uint64_t{1} << 31)) return {};
  std::string cd(cd_size, '\0');
  in.seekg(static_cast<std::streamoff>(cd_offset));
  in.read(cd.data(), static_cast<std::streamsize>(cd_size));
  if (!in) return {};
  std::vector<uint64_t> sizes;
  size_t at = 0;
  for (uint64_t e = 0; e < entries && at + 46 <= cd.size(); ++e) {
    if (cd.compare(at, 4, std::string("PK\x01\x02", 4)) != 0) return {};
    uint64_t size = le(cd, at + 24, 4);
    const size_t name_len = le(cd, at + 28, 2), extra_len = le(cd, at + 30, 2), comment_len = le(cd, at + 32, 2);
    if (at + 46 + name_len + extra_len > cd.size()) return {};
    const std::string name = cd.substr(at + 46, name_len);
    for (size_t x = at + 46 + name_len; size == 0xffffffff && x + 4 <= at + 46 + name_len + extra_len;) {
      const uint64_t id = le(cd, x, 2), len = le(cd, x + 2, 2);
      if (id == 1 && len >= 8 && x + 12 <= cd.size()) size = le(cd, x + 4, 8);
      x += 4 + len;
    }
    const size_t slash = name.find("/data/");
    if (slash != std::string::npos && name.find('/', slash + 6) == std::string::npos) sizes.push_back(size);
    at += 46 + name_len + extra_len + comment_len;
  }
  return sizes;
}

// Every parameter and buffer must lie inside its storage, and every storage inside a data record of the archive:
// LibTorch sizes a storage by what the archive's pickle says, not by the record it reads, so a damaged file with a
// short record would be read past its end.
void check_tensor_storage(const torch::jit::Module& module, const fs::path& path, const std::string& origin) {
  std::map<const void*, uint64_t> storages;
  for (const auto& p : module.named_parameters(/*recurse=*/true))
    if (p.value.defined() && p.value.has_storage()) storages[p.value.storage().data()] = p.value.storage().nbytes();
  for (const auto& b : module.named_buffers(/*recurse=*/true))
    if (b.value.defined() && b.value.has_storage()) storages[b.value.storage().data()] = b.value.storage().nbytes();
  std::vector<uint64_t> needed, records = data_record_sizes(path);
  for (const auto& [ptr, bytes] : storages) needed.push_back(bytes);
  if (!records.empty()) {
    // Each storage has its own record at least as large: compare the k-th largest of each.
    std::sort(needed.rbegin(), needed.rend());
    std::sort(records.rbegin(), records.rend());
    for (size_t k = 0; k < needed.size(); ++k)
      if (k >= records.size() || needed[k] > records[k])
        throw InputError(origin + ": a tensor needs " + std::to_string(needed[k]) + " bytes but the archive's data " +
                         "records are shorter; the file is truncated or damaged: export it again");
  }
  auto check = [&](const std::string& name, const at::Tensor& t) {
    if (!t.defined() || t.numel() == 0) return;
    if (!t.has_storage()) throw InputError(origin + ": tensor " + name + " has no data; the file is damaged");
    int64_t last = t.storage_offset();
    for (int64_t d = 0; d < t.dim(); ++d) {
      if (t.stride(d) < 0) throw InputError(origin + ": tensor " + name + " has a negative stride; the file is damaged");
      last += (t.size(d) - 1) * t.stride(d);
    }
    const auto needed = static_cast<uint64_t>(last + 1) * t.element_size();
    if (needed > t.storage().nbytes())
      throw InputError(origin + ": tensor " + name + " needs " + std::to_string(needed) + " bytes but its record holds " +
                       std::to_string(t.storage().nbytes()) + "; the file is truncated or damaged: export it again");
  };
  for (const auto& p : module.named_parameters(/*recurse=*/true)) check(p.name, p.value);
  for (const auto& b : module.named_buffers(/*recurse=*/true)) check(b.name, b.value);
}

}  // namespace

Bundle load_bundle(const fs::path& path) {
  // Adapters rewrite graphs before the first call, and training needs plain autograd through the interpreter:
  // the optimising executor would specialise graphs (and more than double memory) after a warm-up call.
  torch::jit::setGraphExecutorOptimize(false);
  if (is_checkpoint_source(path.string())) {
    ImportedModel imported = import_checkpoint(path.string());
    Bundle b;
    b.module = imported.module;
    b.info = BundleInfo::from_json(imported.metadata, path.string());
    b.path = path;
    b.extra_files = std::move(imported.extra_files);
    b.module.eval();
    b.fingerprint = weights_fingerprint(b.module);
    return b;
  }
  std::error_code ec;
  const auto status = fs::status(path, ec);
  if (ec && ec != std::errc::no_such_file_or_directory)
    throw InputError("model file " + path.string() + ": " + ec.message());
  if (!fs::exists(status)) throw InputError("model file " + path.string() + " does not exist");
  if (fs::is_directory(status))
    throw InputError("model " + path.string() + " is a folder without config.json or open_clip_config.json; give a "
                     "bundle file (.pt) or a checkpoint folder");
  // Text encoders carry their tokenizer's file under one of these names: read with the rest, kept in extra_files.
  const std::vector<std::string> tokenizer_files{"bpe_merges.txt", "spiece.model"};
  torch::jit::ExtraFilesMap extra{{kBundleMetadataName, ""}};
  for (const auto& name : tokenizer_files) extra[name] = "";
  Bundle b;
  auto first_line = [](const std::string& text) { return text.substr(0, std::min<size_t>(text.find('\n'), 300)); };
  try {
    b.module = torch::jit::load(path.string(), c10::Device(c10::kCPU), extra);
  } catch (const c10::Error& e) {
    throw InputError(path.string() + " is not a TorchScript file that this LibTorch can load: " +
                     first_line(e.what_without_backtrace()));
  } catch (const std::exception& e) {  // the TorchScript parser throws its own error types
    throw InputError(path.string() + " is not a TorchScript file that this LibTorch can load: " + first_line(e.what()));
  }
  for (const auto& name : tokenizer_files)
    if (!extra[name].empty()) b.extra_files[name] = extra[name];
  std::string meta = extra[kBundleMetadataName];
  std::string origin = path.string();
  if (meta.empty()) {
    const fs::path sidecar = path.string() + ".json";
    if (!fs::exists(sidecar, ec))
      throw InputError(path.string() + " has no loratune metadata (no " + kBundleMetadataName + " inside and no " +
                       sidecar.filename().string() + " beside it); export it with scripts/export/ or write the "
                       "sidecar as described in docs/bundle-format.md");
    meta = read_file(sidecar);
    origin = sidecar.string();
  }
  json j;
  try {
    j = json::parse(meta);
  } catch (const json::exception& e) {
    throw InputError(origin + ": metadata is not valid JSON (" + std::string(e.what()) + ")");
  }
  b.info = BundleInfo::from_json(j, origin);
  b.path = path;
  b.module.eval();
  check_trainable_graph(b.module, path.string());
  if (!b.info.blocks.empty()) {
    try {
      b.blocks_module();
    } catch (const InputError& e) {
      throw InputError(origin + ": metadata \"blocks\" names a module the model does not have (" + e.what() + ")");
    }
  }
  check_tensor_storage(b.module, path, path.string());
  b.fingerprint = weights_fingerprint(b.module);
  return b;
}

void save_bundle(torch::jit::Module& module, const BundleInfo& info, const fs::path& path,
                 const std::function<void(const fs::path&)>& check, const std::map<std::string, std::string>& extra_files) {
  torch::jit::ExtraFilesMap extra(extra_files.begin(), extra_files.end());
  extra[kBundleMetadataName] = info.to_json().dump(2, ' ', false, nlohmann::json::error_handler_t::replace);
  write_atomic_with(path, [&](const fs::path& tmp) {
    try {
      module.save(tmp.string(), extra);
    } catch (const c10::Error& e) {
      throw RuntimeFailure("cannot write " + path.string() + " (disk full or no permission?): " + e.what_without_backtrace());
    }
    if (check) check(tmp);
  });
}

fs::path text_model_for(const Bundle& image_bundle) {
  const std::string name = image_bundle.info.extra.value("text_model", "");
  if (name.empty())
    throw InputError(image_bundle.path.string() + " names no text encoder; pass one (--text-model or head.text_model)");
  return text_tower_path(image_bundle.path.parent_path() / name);
}

fs::path text_tower_path(const fs::path& given) {
  return is_checkpoint_source(given.string()) ? fs::path(text_tower_source(given.string())) : given;
}

}  // namespace loratune
