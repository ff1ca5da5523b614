#include "loratune/bundle.h"

#include <torch/csrc/jit/runtime/graph_executor.h>
#include <torch/csrc/jit/serialization/import.h>

#include <set>

#include "common/torch_compat.h"
#include "loratune/errors.h"
#include "loratune/files.h"
#include "loratune/fingerprint.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace loratune {
namespace {

template <typename T>
T field(const json& j, const char* key, const T& fallback, const std::string& origin) {
  if (!j.contains(key)) return fallback;
  try {
    return j.at(key).get<T>();
  } catch (const json::exception&) {
    throw InputError(origin + ": metadata field \"" + key + "\" has the wrong type (" + j.at(key).dump() + ")");
  }
}

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
  j["image_size"] = image_size;
  j["resize_size"] = resize_size;
  j["interpolation"] = interpolation;
  j["mean"] = mean;
  j["std"] = std;
  j["blocks"] = blocks;
  j["module_prefix"] = module_prefix;
  if (!classes.empty()) j["classes"] = classes;
  return j;
}

BundleInfo BundleInfo::from_json(const json& j, const std::string& origin) {
  if (!j.is_object()) throw InputError(origin + ": bundle metadata is not a JSON object");
  const int format = field<int>(j, "format", 0, origin);
  if (format != kBundleFormatVersion)
    throw InputError(origin + ": bundle metadata format " + std::to_string(format) + " is not supported (expected " +
                     std::to_string(kBundleFormatVersion) + "); re-export the model with scripts/export/");
  BundleInfo info;
  info.kind = field<std::string>(j, "kind", info.kind, origin);
  info.family = field<std::string>(j, "family", "", origin);
  info.architecture = field<std::string>(j, "architecture", "", origin);
  info.name = field<std::string>(j, "name", "", origin);
  info.feature_dim = field<int64_t>(j, "feature_dim", 0, origin);
  info.image_size = field<int64_t>(j, "image_size", info.image_size, origin);
  info.resize_size = field<int64_t>(j, "resize_size", info.resize_size, origin);
  info.interpolation = field<std::string>(j, "interpolation", info.interpolation, origin);
  info.mean = field<std::array<float, 3>>(j, "mean", info.mean, origin);
  info.std = field<std::array<float, 3>>(j, "std", info.std, origin);
  info.blocks = field<std::string>(j, "blocks", "", origin);
  info.module_prefix = field<std::string>(j, "module_prefix", "", origin);
  info.classes = field<std::vector<std::string>>(j, "classes", {}, origin);
  if (info.kind != "backbone" && info.kind != "classifier" && info.kind != "text_encoder")
    throw InputError(origin + ": metadata kind must be \"backbone\", \"classifier\" or \"text_encoder\", not \"" +
                     info.kind + "\"");
  if (info.feature_dim <= 0) throw InputError(origin + ": metadata feature_dim must be a positive integer");
  for (const auto& [key, value] : j.items())
    if (!kKnownFields.count(key)) info.extra[key] = value;
  if (info.kind == "text_encoder") return info;
  if (info.image_size <= 0 || info.resize_size < info.image_size)
    throw InputError(origin + ": metadata needs 0 < image_size <= resize_size");
  const std::set<std::string> interpolations = {"bilinear", "bicubic", "nearest", "area"};
  if (!interpolations.count(info.interpolation))
    throw InputError(origin + ": metadata interpolation \"" + info.interpolation +
                     "\" is not one of bilinear, bicubic, nearest, area");
  for (float s : info.std)
    if (!(s > 0)) throw InputError(origin + ": metadata std values must be positive");
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

// Every parameter and buffer must lie inside its storage: a damaged archive can hold a record shorter than the tensor.
void check_tensor_storage(const torch::jit::Module& module, const std::string& origin) {
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
  std::error_code ec;
  const auto status = fs::status(path, ec);
  if (ec && ec != std::errc::no_such_file_or_directory)
    throw InputError("model file " + path.string() + ": " + ec.message());
  if (!fs::exists(status)) throw InputError("model file " + path.string() + " does not exist");
  if (fs::is_directory(status)) throw InputError("model file " + path.string() + " is a folder; give the .pt file");
  torch::jit::ExtraFilesMap extra{{kBundleMetadataName, ""}};
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
  check_tensor_storage(b.module, path.string());
  b.fingerprint = weights_fingerprint(b.module);
  return b;
}

void save_bundle(torch::jit::Module& module, const BundleInfo& info, const fs::path& path,
                 const std::function<void(const fs::path&)>& check) {
  torch::jit::ExtraFilesMap extra{{kBundleMetadataName, info.to_json().dump(2, ' ', false, nlohmann::json::error_handler_t::replace)}};
  write_atomic_with(path, [&](const fs::path& tmp) {
    try {
      module.save(tmp.string(), extra);
    } catch (const c10::Error& e) {
      throw RuntimeFailure("cannot write " + path.string() + " (disk full or no permission?): " + e.what_without_backtrace());
    }
    if (check) check(tmp);
  });
}

}  // namespace loratune
