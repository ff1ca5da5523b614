#include "loratune/adapter.h"

#include <fstream>
#include <regex>

#include "loratune/errors.h"
#include "loratune/files.h"
#include "loratune/safetensors.h"
#include "loratune/text.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace loratune {
namespace {

constexpr const char* kKeyPrefix = "base_model.model.";
constexpr const char* kHeadModule = "classifier";

// PEFT key stem of a target: "<module>[.<param>]", then ".lora_A[.<slice>].weight".
std::string target_key(const LoraTarget& t, char which) {
  return std::string(kKeyPrefix) + t.module + (t.param == "weight" ? "" : "." + t.param) + ".lora_" + which +
         (t.slice.empty() ? "" : "." + t.slice) + ".weight";
}

json target_json(const LoraTarget& t) {
  return {{"module", t.module}, {"param", t.param}, {"slice", t.slice}, {"rank", t.rank}, {"alpha", t.alpha},
          {"rows", t.rows}, {"row_begin", t.row_begin}, {"in_features", t.in_features}};
}

json settings_json(const LoraSettings& s) {
  return {{"rank", s.rank}, {"alpha", s.alpha}, {"dropout", s.dropout}, {"rslora", s.rslora}, {"targets", s.targets},
          {"rank_pattern", s.rank_pattern}, {"alpha_pattern", s.alpha_pattern}};
}

// PEFT's rule for rank_pattern / alpha_pattern keys: the key matches the end of the module name at a dot boundary.
bool peft_pattern_matches(const std::string& key, const std::string& module) {
  try {
    return std::regex_match(module, std::regex("(.*\\.)?(" + key + ")"));
  } catch (const std::regex_error&) {
    return false;
  }
}

json peft_config(const Adapter& a) {
  std::set<std::string> names;
  for (const auto& t : a.targets) {
    const size_t dot = t.module.rfind('.');
    names.insert(dot == std::string::npos ? t.module : t.module.substr(dot + 1));
  }
  json rank_pattern = json::object(), alpha_pattern = json::object();
  for (const auto& t : a.targets) {
    if (t.rank != a.lora.rank) rank_pattern[t.module] = t.rank;
    if (t.alpha != a.lora.alpha) alpha_pattern[t.module] = t.alpha;
  }
  return {{"peft_type", "LORA"},
          {"task_type", nullptr},
          {"base_model_name_or_path", a.base_name},
          {"r", a.lora.rank},
          {"lora_alpha", a.lora.alpha},
          {"lora_dropout", a.lora.dropout},
          {"use_rslora", a.lora.rslora},
          {"target_modules", names},
          {"rank_pattern", rank_pattern},
          {"alpha_pattern", alpha_pattern},
          {"bias", "none"},
          {"fan_in_fan_out", false},
          {"init_lora_weights", true},
          {"inference_mode", true},
          {"modules_to_save", a.head_weight.defined() ? json::array({kHeadModule}) : json::array()}};
}

}  // namespace

std::string strip_prefix(const std::string& path, const std::string& prefix) {
  if (prefix.empty()) return path;
  if (path.compare(0, prefix.size(), prefix) != 0)
    throw InputError("module " + path + " is outside the model's prefix \"" + prefix + "\"");
  return path.substr(prefix.size());
}

std::string add_prefix(const std::string& path, const std::string& prefix) { return prefix + path; }

void save_adapter(const fs::path& dir, const Adapter& a) {
  safetensors::Tensors tensors;
  json targets = json::array();
  for (const auto& t : a.targets) {
    tensors[target_key(t, 'A')] = t.A.detach().to(at::kCPU, at::kFloat);
    tensors[target_key(t, 'B')] = t.B.detach().to(at::kCPU, at::kFloat);
    targets.push_back(target_json(t));
  }
  if (a.head_weight.defined()) {
    tensors[std::string(kKeyPrefix) + kHeadModule + ".weight"] = a.head_weight.detach().to(at::kCPU, at::kFloat);
    tensors[std::string(kKeyPrefix) + kHeadModule + ".bias"] = a.head_bias.detach().to(at::kCPU, at::kFloat);
  }
  for (const auto& [name, w] : a.full_weights) tensors[std::string(kKeyPrefix) + name] = w.detach().to(at::kCPU);
  const json meta = {{"method", a.method},     {"lora", settings_json(a.lora)},
                     {"targets", targets},     {"classes", a.classes},
                     {"base_fingerprint", a.base_fingerprint}, {"base_name", a.base_name},
                     {"training", a.training}, {"head_module", kHeadModule},
                     {"normalize_features", a.normalize_features},
                     {"full_weights", a.full_weights.size()}};
  const safetensors::Metadata metadata = {{"format", kAdapterFormat}, {"loratune", meta.dump()}};
  const std::string weights = safetensors::serialize(tensors, metadata);
  const std::string config = peft_config(a).dump(2) + "\n";
  write_directory_atomic(dir, [&](const fs::path& tmp) {
    for (const auto& [name, bytes] : {std::pair{kAdapterWeightsName, &weights}, std::pair{kAdapterConfigName, &config}}) {
      std::ofstream out(tmp / name, std::ios::binary);
      out.write(bytes->data(), static_cast<std::streamsize>(bytes->size()));
      if (!out) throw RuntimeFailure("cannot write " + (tmp / name).string());
    }
  });
}

Adapter load_adapter(const fs::path& path) {
  fs::path weights_path = path, config_path;
  if (fs::is_directory(path)) {
    weights_path = path / kAdapterWeightsName;
    config_path = path / kAdapterConfigName;
    if (!fs::exists(weights_path)) throw InputError(path.string() + " is not an adapter: it has no " + kAdapterWeightsName);
  } else {
    if (!fs::exists(path)) throw InputError("adapter " + path.string() + " does not exist");
    config_path = path.parent_path() / kAdapterConfigName;
  }
  const auto contents = safetensors::read(weights_path);
  const std::string origin = path.string();
  Adapter a;
  json meta;
  auto it = contents.metadata.find("loratune");
  if (it != contents.metadata.end()) {
    try {
      meta = json::parse(it->second);
      a.method = meta.at("method").get<std::string>();
      const json& s = meta.at("lora");
      a.lora.rank = s.at("rank");
      a.lora.alpha = s.at("alpha");
      a.lora.dropout = s.at("dropout");
      a.lora.rslora = s.at("rslora");
      a.lora.targets = s.at("targets").get<std::vector<std::string>>();
      a.lora.rank_pattern = s.at("rank_pattern").get<std::map<std::string, int64_t>>();
      a.lora.alpha_pattern = s.at("alpha_pattern").get<std::map<std::string, double>>();
      a.classes = meta.at("classes").get<std::vector<std::string>>();
      a.base_fingerprint = meta.at("base_fingerprint");
      a.base_name = meta.at("base_name");
      a.training = meta.at("training");
      a.normalize_features = meta.value("normalize_features", false);
    } catch (const json::exception& e) {
      throw InputError(origin + ": loratune metadata is damaged (" + std::string(e.what()) + ")");
    }
  } else {
    // An adapter from PEFT: settings come from adapter_config.json.
    if (config_path.empty() || !fs::exists(config_path))
      throw InputError(origin + " has no loratune metadata and no adapter_config.json beside it; cannot tell its "
                       "lora_alpha");
    try {
      const json c = json::parse(read_file(config_path));
      if (c.value("peft_type", "") != "LORA") throw InputError(config_path.string() + ": peft_type is not LORA");
      a.lora.rank = c.at("r");
      a.lora.alpha = c.at("lora_alpha");
      a.lora.dropout = c.value("lora_dropout", 0.0);
      a.lora.rslora = c.value("use_rslora", false);
      if (c.contains("rank_pattern") && c["rank_pattern"].is_object()) a.lora.rank_pattern = c["rank_pattern"];
      if (c.contains("alpha_pattern") && c["alpha_pattern"].is_object()) a.lora.alpha_pattern = c["alpha_pattern"];
      a.base_name = c.value("base_model_name_or_path", "");
    } catch (const json::exception& e) {
      throw InputError(config_path.string() + ": not a PEFT LoRA config (" + std::string(e.what()) + ")");
    }
  }

  // Tensors: adapters by key, the head, full weights.
  static const std::regex lora_key(R"((.*)\.lora_([AB])(?:\.([qkv]))?\.weight)");
  std::map<std::string, LoraTarget> found;  // by "<module>|<param>|<slice>"
  const std::string head_prefix = std::string(kKeyPrefix) + kHeadModule + ".";
  for (const auto& [key, tensor] : contents.tensors) {
    std::string name = key;
    if (name.compare(0, std::strlen(kKeyPrefix), kKeyPrefix) == 0) name = name.substr(std::strlen(kKeyPrefix));
    std::smatch m;
    if (std::regex_match(name, m, lora_key)) {
      std::string module = m[1], param = "weight";
      const size_t dot = module.rfind('.');
      const std::string last = dot == std::string::npos ? module : module.substr(dot + 1);
      if (last.size() > 7 && last.compare(last.size() - 7, 7, "_weight") == 0)
        param = last, module = dot == std::string::npos ? "" : module.substr(0, dot);
      LoraTarget& t = found[module + "|" + param + "|" + m[3].str()];
      t.module = module;
      t.param = param;
      t.slice = m[3];
      if (tensor.dim() != 2 || !tensor.is_floating_point())
        throw InputError(origin + ": tensor " + key + " is not a 2-D floating point matrix");
      (m[2] == "A" ? t.A : t.B) = tensor.to(at::kFloat);
    } else if (key == head_prefix + "weight") {
      a.head_weight = tensor.to(at::kFloat);
    } else if (key == head_prefix + "bias") {
      a.head_bias = tensor.to(at::kFloat);
    } else {
      a.full_weights[name] = tensor;
    }
  }
  for (auto& [id, t] : found) {
    if (!t.A.defined() || !t.B.defined())
      throw InputError(origin + ": adapter " + t.module + " has only one of lora_A / lora_B");
    if (t.A.size(0) != t.B.size(1))
      throw InputError(origin + ": adapter " + t.module + " has lora_A rank " + std::to_string(t.A.size(0)) +
                       " but lora_B rank " + std::to_string(t.B.size(1)));
    t.rank = t.A.size(0);
    t.in_features = t.A.size(1);
    t.rows = t.B.size(0);
    t.rslora = a.lora.rslora;
    t.alpha = a.lora.alpha;
    for (const auto& [k, v] : a.lora.alpha_pattern)
      if (peft_pattern_matches(k, t.module)) t.alpha = v;
    a.targets.push_back(std::move(t));
  }
  if (!meta.is_null()) {
    // Exact ranks and alphas as recorded, slice by slice.
    for (const auto& jt : meta.at("targets")) {
      auto match = std::find_if(a.targets.begin(), a.targets.end(), [&](const LoraTarget& t) {
        return t.module == jt.at("module").get<std::string>() && t.param == jt.at("param").get<std::string>() &&
               t.slice == jt.at("slice").get<std::string>();
      });
      if (match == a.targets.end())
        throw InputError(origin + ": adapter " + jt.at("module").get<std::string>() + " is listed but has no tensors");
      match->alpha = jt.at("alpha");
    }
    if (a.targets.size() != meta.at("targets").size())
      throw InputError(origin + ": the file holds adapter tensors its metadata does not list");
  }
  if (a.head_weight.defined() != a.head_bias.defined())
    throw InputError(origin + ": classifier head is incomplete (weight and bias must both be present)");
  if (a.head_weight.defined() && a.head_weight.dim() != 2)
    throw InputError(origin + ": classifier weight must be 2-D");
  if (a.head_weight.defined() && !a.classes.empty() && static_cast<int64_t>(a.classes.size()) != a.head_weight.size(0))
    throw InputError(origin + ": " + std::to_string(a.classes.size()) + " class names for a head of " +
                     std::to_string(a.head_weight.size(0)) + " outputs");
  if (a.head_weight.defined() && a.classes.empty())
    for (int64_t i = 0; i < a.head_weight.size(0); ++i) a.classes.push_back("class_" + std::to_string(i));
  if (a.method == "full" && a.full_weights.empty()) throw InputError(origin + ": method full but no base weights stored");
  return a;
}

Adapter adapter_from_model(const Model& model, const std::vector<std::string>& classes, json training) {
  Adapter a;
  const std::string& prefix = model.bundle().info.module_prefix;
  a.method = method_name(model.method());
  a.lora = model.lora_settings();
  if (model.method() == Method::kLora)
    for (const auto& t : model.adapters()) {
      LoraTarget c = t;
      c.module = strip_prefix(t.module, prefix);
      c.A = t.A.detach().to(at::kCPU);
      c.B = t.B.detach().to(at::kCPU);
      a.targets.push_back(std::move(c));
    }
  if (model.method() == Method::kFull) {
    auto module = model.bundle().module;
    for (const auto& p : module.named_parameters()) a.full_weights[strip_prefix(p.name, prefix)] = p.value.detach().to(at::kCPU);
  }
  a.head_weight = model.head_weight().detach().to(at::kCPU);
  a.normalize_features = model.normalize_features();
  a.head_bias = model.head_bias().detach().to(at::kCPU);
  a.classes = classes;
  a.base_fingerprint = model.bundle().fingerprint;
  a.base_name = model.bundle().info.name.empty() ? model.bundle().path.filename().string() : model.bundle().info.name;
  a.training = std::move(training);
  return a;
}

std::vector<LoraTarget> bind_targets(const Adapter& a, const Bundle& bundle, const std::string& origin) {
  std::vector<LoraTarget> out;
  for (const auto& t : a.targets) {
    LoraTarget b = t;
    b.module = add_prefix(t.module, bundle.info.module_prefix);
    torch::jit::Module m;
    try {
      m = submodule_at(bundle.module, b.module);
    } catch (const InputError&) {
      throw InputError(origin + " was made for another base: it adapts " + t.module + ", which " +
                       bundle.path.string() + " does not have");
    }
    if (!m.hasattr(b.param) || !m.attr(b.param).isTensor())
      throw InputError(origin + " was made for another base: " + t.module + " has no weight " + b.param);
    const at::Tensor w = m.attr(b.param).toTensor();
    const int64_t rows = b.slice.empty() ? w.size(0) : w.size(0) / 3;
    if (w.dim() != 2 || w.size(1) != b.in_features || rows != b.rows || (!b.slice.empty() && w.size(0) % 3 != 0))
      throw InputError(origin + " was made for another base: adapter " + t.describe() + " does not fit the weight " +
                       b.module + " [" + std::to_string(w.size(0)) + "x" + std::to_string(w.size(1)) + "]");
    b.row_begin = b.slice.empty() ? 0 : (b.slice == "q" ? 0 : b.slice == "k" ? 1 : 2) * rows;
    out.push_back(std::move(b));
  }
  return out;
}

void check_adapter_base(const Adapter& a, const Bundle& bundle, const std::string& origin) {
  if (!a.base_fingerprint.empty() && a.base_fingerprint != bundle.fingerprint)
    throw InputError(origin + " was trained on a different base model (adapter base fingerprint " + a.base_fingerprint +
                     " \"" + a.base_name + "\", " + bundle.path.string() + " has " + bundle.fingerprint + ")");
  bind_targets(a, bundle, origin);
  if (a.head_weight.defined() && a.head_weight.size(1) != bundle.info.feature_dim)
    throw InputError(origin + " was made for another base: its head takes " + std::to_string(a.head_weight.size(1)) +
                     " features, " + bundle.path.string() + " gives " + std::to_string(bundle.info.feature_dim));
  if (!a.full_weights.empty()) {
    auto module = bundle.module;
    std::map<std::string, at::Tensor> params;
    for (const auto& p : module.named_parameters()) params[strip_prefix(p.name, bundle.info.module_prefix)] = p.value;
    for (const auto& [name, w] : a.full_weights) {
      auto it = params.find(name);
      if (it == params.end())
        throw InputError(origin + " was made for another base: " + bundle.path.string() + " has no parameter " + name);
      if (it->second.sizes() != w.sizes())
        throw InputError(origin + " was made for another base: parameter " + name + " has shape [" +
                         c10::str(w.sizes()) + "], the model's is [" + c10::str(it->second.sizes()) + "]");
    }
  }
}

void apply_adapter(Model& model, const Adapter& a, const std::string& origin) {
  check_adapter_base(a, model.bundle(), origin);
  if (!a.full_weights.empty()) {
    at::NoGradGuard no_grad;
    auto module = model.module();
    for (const auto& p : module.named_parameters()) {
      auto it = a.full_weights.find(strip_prefix(p.name, model.bundle().info.module_prefix));
      if (it != a.full_weights.end()) p.value.copy_(it->second);
    }
  }
  if (!a.targets.empty()) model.set_adapters(bind_targets(a, model.bundle(), origin), a.lora);
  else model.clear_adapters();
  if (a.head_weight.defined()) model.set_head(a.head_weight, a.head_bias);
  model.set_normalize_features(a.normalize_features);
}

}  // namespace loratune
