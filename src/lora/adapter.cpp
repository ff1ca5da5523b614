#include "loratune/adapter.h"

#include <algorithm>
#include <cstring>
#include <iterator>
#include <set>

#include "loratune/adapter_init.h"
#include "loratune/adapter_variant.h"
#include "common/pattern_match.h"
#include "loratune/errors.h"
#include "common/files.h"
#include "common/fingerprint.h"
#include "loratune/safetensors.h"
#include "common/strings.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace loratune {
namespace {

constexpr const char* kKeyPrefix = "base_model.model.";
constexpr const char* kHeadModule = "classifier";

// PEFT key stem of a target: "<module>[.<param>]", then ".lora_A[.<slice>].weight".
std::string target_key(const TargetKey& t, const std::string& tensor) {
  return std::string(kKeyPrefix) + t.module + (t.param == "weight" ? "" : "." + t.param) + ".lora_" + tensor +
         (t.slice.empty() ? "" : "." + t.slice) + ".weight";
}

json target_json(const LoraTarget& t) {
  return {{"module", t.module}, {"param", t.param}, {"slice", t.slice}, {"rank", t.rank}, {"alpha", t.alpha},
          {"rows", t.rows}, {"row_begin", t.row_begin}, {"in_features", t.in_features}};
}

json settings_json(const LoraSettings& s) {
  json j = {{"rank", s.rank},       {"alpha", s.alpha},
            {"dropout", s.dropout}, {"rslora", s.rslora},
            {"targets", s.targets}, {"rank_pattern", s.rank_pattern},
            {"alpha_pattern", s.alpha_pattern}};
  if (!s.text_targets.empty()) j["text_targets"] = s.text_targets;
  if (s.variant != lora_variant().name()) j["variant"] = s.variant;  // absent: plain LoRA (files from before variants)
  // How training started (absent: the default); the tensors apply to the unmodified base whatever the start.
  if (s.init != default_adapter_init().name()) j["init"] = s.init;
  return j;
}

// PEFT's prompt-tuning key for the one set of shallow prompts; deep prompts add the block: "prompt_embeddings.3".
constexpr const char* kPromptKey = "prompt_embeddings";
std::string prompt_key(int64_t block) { return block < 0 ? kPromptKey : kPromptKey + ("." + std::to_string(block)); }

// AdaptFormer's tensors: "adaptformer.<block>.down.weight" and so on (adaptformer_tensor_names()).
constexpr const char* kAdaptFormerPrefix = "adaptformer.";

constexpr size_t kMaxNameLength = 4096;   // bytes of a tensor key or module path
constexpr size_t kMaxPatternKeys = 10000;  // rank_pattern / alpha_pattern entries

// A tensor key "<module>.lora_<tensor>[.<q|k|v>].weight", split without regular expressions (keys are untrusted
// input).
struct LoraKey {
  std::string module, slice;
  std::string tensor;  // a tensor name of some registered variant ("A", "B", ...); empty: not an adapter key
};

// The adapter tensor with this name in some registered variant.
const AdapterTensorSpec* find_tensor_spec(const std::string& name) {
  for (const auto* variant : adapter_variants())
    for (const auto& spec : variant->tensor_specs())
      if (spec.name == name) return &spec;
  return nullptr;
}

LoraKey parse_lora_key(const std::string& name) {
  LoraKey k;
  const std::string weight = ".weight";
  if (name.size() <= weight.size() || name.compare(name.size() - weight.size(), weight.size(), weight) != 0) return k;
  std::string rest = name.substr(0, name.size() - weight.size());
  std::string slice;
  if (rest.size() > 2 && rest[rest.size() - 2] == '.' && std::strchr("qkv", rest.back()) != nullptr) {
    slice = rest.substr(rest.size() - 1);
    rest.resize(rest.size() - 2);
  }
  const size_t marker = rest.rfind(".lora_");
  if (marker == std::string::npos || marker == 0) return k;
  const std::string tensor = rest.substr(marker + 6);
  if (find_tensor_spec(tensor) == nullptr) return k;
  k.module = rest.substr(0, marker);
  k.slice = slice;
  k.tensor = tensor;
  return k;
}

// PEFT's rule for rank_pattern / alpha_pattern keys: the key, a regular expression, matches the end of the module
// name at a dot boundary; the first key that matches wins.
class PeftPatterns {
 public:
  template <typename Value>
  PeftPatterns(const std::map<std::string, Value>& keys, const std::string& what, const std::string& origin) {
    if (keys.size() > kMaxPatternKeys)
      throw InputError(origin + ": more than " + std::to_string(kMaxPatternKeys) + " " + what + " keys");
    for (const auto& [key, value] : keys)
      patterns_.emplace_back(PatternMatcher("(.*\\.)?(" + key + ")", origin + ": " + what + " key"),
                             static_cast<double>(value));
  }
  const double* find(const std::string& module) const {
    for (const auto& [matcher, value] : patterns_)
      if (matcher.full_match(module)) return &value;
    return nullptr;
  }

 private:
  std::vector<std::pair<PatternMatcher, double>> patterns_;
};

// A checksum of every tensor (name, dtype, shape, bytes) written into the metadata: a flipped bit anywhere in the
// data makes loading fail instead of giving quietly different results.
std::string tensors_hash(const safetensors::Tensors& tensors) { return tensors_fingerprint(tensors, 0x61646170ULL); }

void check_finite(const at::Tensor& t, const std::string& origin, const std::string& key) {
  if (t.is_floating_point() && t.numel() > 0 && !at::isfinite(t).all().item<bool>())
    throw InputError(origin + ": tensor " + key + " holds NaN or infinite values; the adapter is damaged");
}

// Both towers' targets: PEFT sees one CLIP model.
std::vector<const LoraTarget*> all_targets(const Adapter& a) {
  std::vector<const LoraTarget*> out;
  for (const auto* list : {&a.targets, &a.text_targets})
    for (const auto& t : *list) out.push_back(&t);
  return out;
}

json peft_config(const Adapter& a) {
  std::set<std::string> names;
  for (const auto* target : all_targets(a)) {
    const LoraTarget& t = *target;
    const size_t dot = t.module.rfind('.');
    names.insert(dot == std::string::npos ? t.module : t.module.substr(dot + 1));
  }
  json rank_pattern = json::object(), alpha_pattern = json::object();
  for (const auto* t : all_targets(a)) {
    if (t->rank != a.lora.rank) rank_pattern[t->module] = t->rank;
    if (t->alpha != a.lora.alpha) alpha_pattern[t->module] = t->alpha;
  }
  json config = {{"peft_type", "LORA"},
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
  for (const auto* variant : adapter_variants())
    if (!variant->peft_flag().empty()) config[variant->peft_flag()] = a.lora.variant == variant->name();
  return config;
}

}  // namespace

void save_adapter(const fs::path& dir, const Adapter& a) {
  safetensors::Tensors tensors;
  json targets = json::array();
  const auto every_target = all_targets(a);
  for (size_t i = 0; i < every_target.size(); ++i) {
    const LoraTarget& t = *every_target[i];
    const auto& specs = t.variant->tensor_specs();
    for (size_t k = 0; k < specs.size(); ++k) {
      const std::string key = target_key(t, specs[k].name);
      if (tensors.count(key)) throw RuntimeFailure("internal: two adapters named " + key);
      tensors[key] = t.tensors.at(k).detach().to(at::kCPU, at::kFloat);
    }
    targets.push_back(target_json(t));
    if (i >= a.targets.size()) targets.back()["tower"] = "text";
  }
  if (a.head_weight.defined()) {
    tensors[std::string(kKeyPrefix) + kHeadModule + ".weight"] = a.head_weight.detach().to(at::kCPU, at::kFloat);
    tensors[std::string(kKeyPrefix) + kHeadModule + ".bias"] = a.head_bias.detach().to(at::kCPU, at::kFloat);
  }
  for (const auto& [name, w] : a.full_weights) tensors[std::string(kKeyPrefix) + name] = w.detach().to(at::kCPU);
  for (size_t i = 0; i < a.prompt_sets.size(); ++i)
    tensors[prompt_key(a.vpt.deep ? static_cast<int64_t>(i) : -1)] = a.prompt_sets[i].detach().to(at::kCPU, at::kFloat);
  for (size_t i = 0; i < a.mlp_adapters.size(); ++i)
    for (size_t k = 0; k < a.mlp_adapters[i].size(); ++k)
      tensors[kAdaptFormerPrefix + std::to_string(i) + "." + adaptformer_tensor_names()[k]] =
          a.mlp_adapters[i][k].detach().to(at::kCPU, at::kFloat);
  json meta = {{"method", method_name(a.method)},     {"lora", settings_json(a.lora)},
                     {"targets", targets},     {"classes", a.classes},
                     {"base_fingerprint", a.base_fingerprint}, {"base_name", a.base_name},
                     {"training", a.training}, {"head_module", kHeadModule},
                     {"normalize_features", a.normalize_features},
                     {"full_weights", a.full_weights.size()}};
  if (!a.text_targets.empty()) {
    meta["text_base_fingerprint"] = a.text_base_fingerprint;
    meta["text_base_name"] = a.text_base_name;
  }
  if (!a.prompts.is_null()) meta["prompts"] = a.prompts;
  if (a.method == Method::kVpt) meta["vpt"] = {{"tokens", a.vpt.tokens}, {"deep", a.vpt.deep}};
  if (a.method == Method::kAdaptFormer)
    meta["adaptformer"] = {{"bottleneck", a.adaptformer.bottleneck}, {"scale", a.adaptformer.scale},
                           {"sequential", a.adaptformer.sequential}};
  const safetensors::Metadata metadata = {{"format", kAdapterFormat},
                                          {"loratune", meta.dump(-1, ' ', false, json::error_handler_t::replace)},
                                          {"tensors_hash", tensors_hash(tensors)}};
  const std::string weights = safetensors::serialize(tensors, metadata);
  // PEFT has no counterpart of a variant without A and B (SSF), of prompts for vision transformers or of AdaptFormer:
  // no adapter_config.json that it would misread.
  const bool peft_readable =
      variant_by_name(a.lora.variant).low_rank() && a.method != Method::kVpt && a.method != Method::kAdaptFormer;
  const std::string config =
      peft_readable ? peft_config(a).dump(2, ' ', false, json::error_handler_t::replace) + "\n" : "";
  std::string initial_head;
  if (a.initial_head_weight.defined()) {
    const safetensors::Tensors head = {{"weight", a.initial_head_weight.detach().to(at::kCPU, at::kFloat)},
                                       {"bias", a.initial_head_bias.detach().to(at::kCPU, at::kFloat)}};
    initial_head = safetensors::serialize(head, {{"format", kAdapterFormat}, {"tensors_hash", tensors_hash(head)}});
  }
  write_directory_atomic(dir, [&](const fs::path& tmp) {
    write_file_durable(tmp / kAdapterWeightsName, weights);
    if (peft_readable) write_file_durable(tmp / kAdapterConfigName, config);
    if (!initial_head.empty()) write_file_durable(tmp / kInitialHeadName, initial_head);
  });
}

namespace {

// Settings from loratune's own metadata (the safetensors __metadata__ "loratune" entry).
json read_loratune_metadata(Adapter& a, const std::string& text, const std::string& origin) {
  try {
    json meta = json::parse(text);
    try {
      a.method = parse_method(meta.at("method").get<std::string>());
    } catch (const InputError& e) {
      throw InputError(origin + ": " + e.what());
    }
    const json& s = meta.at("lora");
    a.lora.rank = s.at("rank");
    a.lora.alpha = s.at("alpha");
    a.lora.dropout = s.at("dropout");
    a.lora.rslora = s.at("rslora");
    a.lora.targets = s.at("targets").get<std::vector<std::string>>();
    a.lora.rank_pattern = s.at("rank_pattern").get<std::map<std::string, int64_t>>();
    a.lora.alpha_pattern = s.at("alpha_pattern").get<std::map<std::string, double>>();
    a.lora.variant = s.value("variant", lora_variant().name());
    a.lora.init = s.value("init", default_adapter_init().name());
    a.lora.text_targets = s.value("text_targets", std::vector<std::string>{});
    a.text_base_fingerprint = meta.value("text_base_fingerprint", "");
    a.text_base_name = meta.value("text_base_name", "");
    if (meta.contains("prompts")) a.prompts = meta.at("prompts");
    if (meta.contains("adaptformer")) {
      a.adaptformer.bottleneck = meta.at("adaptformer").at("bottleneck").get<int64_t>();
      a.adaptformer.scale = meta.at("adaptformer").at("scale").get<double>();
      a.adaptformer.sequential = meta.at("adaptformer").value("sequential", false);
    }
    if (meta.contains("vpt")) {
      a.vpt.tokens = meta.at("vpt").at("tokens").get<int64_t>();
      a.vpt.deep = meta.at("vpt").at("deep").get<bool>();
    }
    a.classes = meta.at("classes").get<std::vector<std::string>>();
    a.base_fingerprint = meta.at("base_fingerprint");
    a.base_name = meta.at("base_name");
    a.training = meta.at("training");
    a.normalize_features = meta.value("normalize_features", false);
    for (const auto& jt : meta.at("targets"))
      if (!jt.at("module").is_string() || !jt.at("param").is_string() || !jt.at("slice").is_string() ||
          !jt.at("alpha").is_number())
        throw InputError(origin + ": loratune metadata is damaged (a target entry has fields of the wrong type); "
                         "re-save the adapter");
    return meta;
  } catch (const json::exception& e) {
    throw InputError(origin + ": loratune metadata is damaged (" + std::string(e.what()) + "); re-save the adapter");
  }
}

// A setting of adapter_config.json, or `fallback` where the key is absent or null (PEFT writes null for unset
// fields, such as base_model_name_or_path of a model built from a config).
template <typename T>
T setting_or(const json& c, const char* key, T fallback) {
  const auto it = c.find(key);
  return it == c.end() || it->is_null() ? fallback : it->get<T>();
}

// PEFT saves a PiSSA / OLoRA adapter as trained (its A and B apply to the base minus their start) unless it is saved
// with path_initial_model_for_weight_conversion, which makes it a LoRA on the unmodified base and says
// init_lora_weights true. CorDA and LoftQ change the base as well.
void refuse_modified_base_start(const json& c, const std::string& where) {
  const auto it = c.find("init_lora_weights");
  if (it == c.end() || !it->is_string()) return;
  const std::string value = it->get<std::string>();
  const std::string start = value.substr(0, value.find("_niter_"));  // "pissa_niter_16": PiSSA by fast SVD
  const AdapterInit* init = find_adapter_init(start);
  if ((init != nullptr && init->takes_from_weight()) || start == "corda" || start == "loftq")
    throw InputError(where + ": init_lora_weights \"" + value + "\" means the adapter applies to a base that PEFT "
                     "changed at its start; save it in PEFT with save_pretrained(..., "
                     "path_initial_model_for_weight_conversion=...) so that it applies to the unmodified base");
}

// PEFT's adapter_config.json: the settings of an adapter written by PEFT.
void read_peft_config(Adapter& a, const json& c, const std::string& where) {
  try {
    if (setting_or<std::string>(c, "peft_type", "") != "LORA") throw InputError(where + ": peft_type is not LORA");
    a.lora.rank = c.at("r");
    a.lora.alpha = c.at("lora_alpha");
    a.lora.dropout = setting_or(c, "lora_dropout", 0.0);
    a.lora.rslora = setting_or(c, "use_rslora", false);
    a.lora.variant = lora_variant().name();
    for (const auto* variant : adapter_variants())
      if (!variant->peft_flag().empty() && setting_or(c, variant->peft_flag().c_str(), false)) a.lora.variant = variant->name();
    refuse_modified_base_start(c, where);
    if (c.contains("rank_pattern") && c["rank_pattern"].is_object()) a.lora.rank_pattern = c["rank_pattern"];
    if (c.contains("alpha_pattern") && c["alpha_pattern"].is_object()) a.lora.alpha_pattern = c["alpha_pattern"];
    a.base_name = setting_or<std::string>(c, "base_model_name_or_path", "");
  } catch (const json::exception& e) {
    throw InputError(where + ": not a PEFT LoRA config (" + std::string(e.what()) + ")");
  }
}

std::vector<std::string> peft_flags() {
  std::vector<std::string> flags;
  for (const auto* variant : adapter_variants())
    if (!variant->peft_flag().empty()) flags.push_back(variant->peft_flag());
  return flags;
}

// The head training started from (kInitialHeadName): the shape of the trained head, finite, checksummed.
void read_initial_head(Adapter& a, const fs::path& path) {
  const auto contents = safetensors::read(path);
  const auto hash = contents.metadata.find("tensors_hash");
  const auto weight = contents.tensors.find("weight"), bias = contents.tensors.find("bias");
  if (hash == contents.metadata.end() || hash->second != tensors_hash(contents.tensors) ||
      weight == contents.tensors.end() || bias == contents.tensors.end() || contents.tensors.size() != 2)
    throw InputError(path.string() + " is damaged (its tensors or checksum are not what loratune writes); delete it "
                     "to merge without interpolating the head, or copy the adapter folder again");
  if (!a.head_weight.defined() || !weight->second.is_floating_point() || !bias->second.is_floating_point() ||
      !weight->second.sizes().equals(a.head_weight.sizes()) || !bias->second.sizes().equals(a.head_bias.sizes()))
    throw InputError(path.string() + " does not fit the adapter's head; delete it to merge without interpolating "
                     "the head");
  check_finite(weight->second, path.string(), "weight");
  check_finite(bias->second, path.string(), "bias");
  a.initial_head_weight = weight->second.to(at::kFloat);
  a.initial_head_bias = bias->second.to(at::kFloat);
}

json parse_config_file(const fs::path& path) {
  try {
    return json::parse(read_file(path));
  } catch (const json::exception& e) {
    throw InputError(path.string() + ": not valid JSON (" + std::string(e.what()) + ")");
  }
}

// The adapter's safetensors file and the adapter_config.json beside it (which may not exist).
struct AdapterFiles {
  fs::path weights, config;
};

AdapterFiles locate_adapter(const fs::path& path) {
  std::error_code ec;
  if (fs::is_directory(path, ec)) {
    if (!fs::exists(path / kAdapterWeightsName, ec))
      throw InputError(path.string() + " is not an adapter: it has no " + kAdapterWeightsName);
    return {path / kAdapterWeightsName, path / kAdapterConfigName};
  }
  if (!fs::exists(path, ec)) throw InputError("adapter " + path.string() + " does not exist");
  return {path, path.parent_path() / kAdapterConfigName};
}

// The checksum loratune writes, and the format version.
void check_envelope(const safetensors::Contents& contents, const std::string& origin) {
  const auto hash = contents.metadata.find("tensors_hash");
  if (hash != contents.metadata.end() && hash->second != tensors_hash(contents.tensors))
    throw InputError(origin + ": the tensors do not match the checksum written with them; the file is damaged "
                     "(copy it again, or train again)");
  const auto format = contents.metadata.find("format");  // PEFT writes "pt" there
  if (format != contents.metadata.end() && format->second.rfind("loratune.adapter/", 0) == 0 &&
      format->second != kAdapterFormat)
    throw InputError(origin + " is a " + format->second + " adapter; this loratune reads " + kAdapterFormat +
                     ": update loratune to use it");
}

// PEFT reads adapter_config.json: it must say what loratune's metadata says, or PEFT would apply another scale.
void check_peft_config_agrees(const Adapter& a, const AdapterFiles& files) {
  Adapter peft;
  read_peft_config(peft, parse_config_file(files.config), files.config.string());
  // Named as adapter_config.json names them: "<key> <there> vs <inside>".
  std::vector<std::string> differ;
  auto compare = [&](const std::string& key, const json& there, const json& inside) {
    if (there != inside) differ.push_back(key + " " + there.dump() + " vs " + inside.dump());
  };
  compare("r", peft.lora.rank, a.lora.rank);
  compare("lora_alpha", peft.lora.alpha, a.lora.alpha);
  compare("use_rslora", peft.lora.rslora, a.lora.rslora);
  for (const auto* variant : adapter_variants())
    if (!variant->peft_flag().empty())
      compare(variant->peft_flag(), peft.lora.variant == variant->name(), a.lora.variant == variant->name());
  if (!differ.empty())
    throw InputError(files.config.string() + " disagrees with the settings inside " + files.weights.string() + " (" +
                     join(differ, ", ") + "); the files were altered or mixed up: copy the adapter folder anew");
}

// The adapter's settings: loratune's metadata (returned) or, for a PEFT adapter, adapter_config.json (null returned).
json read_settings(Adapter& a, const safetensors::Contents& contents, const AdapterFiles& files, bool folder,
                   const std::string& origin) {
  std::error_code ec;
  const bool has_config = fs::exists(files.config, ec);
  const auto it = contents.metadata.find("loratune");
  if (it == contents.metadata.end()) {
    if (!has_config)
      throw InputError(origin + " has no loratune metadata and no adapter_config.json beside it; cannot tell its "
                       "lora_alpha");
    read_peft_config(a, parse_config_file(files.config), files.config.string());
    return nullptr;
  }
  json meta = read_loratune_metadata(a, it->second, origin);
  if (has_config && folder) check_peft_config_agrees(a, files);
  return meta;
}

// One adapter tensor (a "lora_A"-like key) into its target's slot of the variant's tensor specs.
void place_adapter_tensor(std::map<TargetKey, LoraTarget>& found, const LoraKey& k, const std::string& key,
                          const at::Tensor& tensor, const AdapterVariant* variant, const std::string& origin) {
  std::string module = k.module, param = "weight";
  const size_t dot = module.rfind('.');
  const std::string last = dot == std::string::npos ? module : module.substr(dot + 1);
  if (last.size() > 7 && last.compare(last.size() - 7, 7, "_weight") == 0)
    param = last, module = dot == std::string::npos ? "" : module.substr(0, dot);
  LoraTarget& t = found[TargetKey{module, param, k.slice}];
  t.module = module;
  t.param = param;
  t.slice = k.slice;
  t.variant = variant;
  const auto& specs = variant->tensor_specs();
  t.tensors.resize(specs.size());
  const auto slot = std::find_if(specs.begin(), specs.end(), [&](const AdapterTensorSpec& s) { return s.name == k.tensor; });
  if (slot == specs.end())
    throw InputError(origin + ": tensor " + key + " belongs to another adapter variant than " + variant->name() +
                     " (adapter_config.json names the variant: " + join(peft_flags(), ", ") + ")");
  if (tensor.dim() != static_cast<int64_t>(slot->shape.size()) || !tensor.is_floating_point())
    throw InputError(origin + ": tensor " + key + " is not a " + std::to_string(slot->shape.size()) +
                     "-D floating point tensor");
  t.tensors[static_cast<size_t>(slot - specs.begin())] = tensor.to(at::kFloat);
}

// A target whose tensors are all there: its rank and sizes from their shapes, its alpha from the patterns.
void complete_target(LoraTarget& t, const Adapter& a, const PeftPatterns& alpha_patterns, const std::string& origin) {
  t.rslora = a.lora.rslora;
  if (!t.variant->low_rank()) {  // vectors over the rows: their length is the rows
    const auto first = std::find_if(t.tensors.begin(), t.tensors.end(), [](const at::Tensor& x) { return x.defined(); });
    t.rows = first == t.tensors.end() || first->dim() != 1 ? 0 : first->size(0);
    if (t.rows == 0) throw InputError(origin + ": " + t.variant->name() + " adapter " + t.module + " is empty; the file is damaged");
    t.variant->check(t, origin);
    t.alpha = a.lora.alpha;
    return;
  }
  if (!t.A().defined() || !t.B().defined())
    throw InputError(origin + ": adapter " + t.module + " has only one of lora_A / lora_B");
  if (t.A().size(0) != t.B().size(1))
    throw InputError(origin + ": adapter " + t.module + " has lora_A rank " + std::to_string(t.A().size(0)) +
                     " but lora_B rank " + std::to_string(t.B().size(1)));
  if (t.A().size(0) == 0 || t.A().size(1) == 0 || t.B().size(0) == 0)
    throw InputError(origin + ": adapter " + t.module + " has an empty lora_A or lora_B (rank 0); the file is damaged");
  t.rank = t.A().size(0);
  t.in_features = t.A().size(1);
  t.rows = t.B().size(0);
  t.variant->check(t, origin);
  const double* alpha = alpha_patterns.find(t.module);
  t.alpha = alpha ? *alpha : a.lora.alpha;
}

constexpr int64_t kNotPrompt = -2;

// The block of a prompt key (-1: the shallow set), or kNotPrompt.
int64_t prompt_block(const std::string& key) {
  const std::string stem = kPromptKey;
  if (key == stem) return -1;
  if (key.size() <= stem.size() + 1 || key.compare(0, stem.size() + 1, stem + ".") != 0) return kNotPrompt;
  const std::string digits = key.substr(stem.size() + 1);
  if (digits.size() > 6 || digits.find_first_not_of("0123456789") != std::string::npos) return kNotPrompt;
  return std::stoll(digits);
}

// Method vpt's sets: the one shallow set, or deep sets for blocks 0, 1, ... without gaps; none for other methods.
void read_prompt_sets(Adapter& a, const std::map<int64_t, at::Tensor>& sets, const std::string& origin) {
  if (a.method != Method::kVpt) {
    if (!sets.empty()) throw InputError(origin + " holds prompt tokens, but its method is " + method_name(a.method));
    return;
  }
  if (sets.empty()) throw InputError(origin + ": method vpt but no prompt tokens stored");
  const bool shallow_key = sets.count(-1) != 0;
  if (shallow_key != !a.vpt.deep || (shallow_key && sets.size() != 1))
    throw InputError(origin + ": its prompt keys do not match vpt.deep " + (a.vpt.deep ? "true" : "false") +
                     " in its metadata; the file is damaged");
  int64_t next = shallow_key ? -1 : 0;
  for (const auto& [block, tensor] : sets) {
    if (block != next) throw InputError(origin + ": prompts for block " + std::to_string(next) + " are missing");
    a.prompt_sets.push_back(tensor);
    next = shallow_key ? 0 : next + 1;
  }
}

// "adaptformer.<block>.<tensor>" into its slot.
void place_mlp_adapter_tensor(std::map<int64_t, std::vector<at::Tensor>>& blocks, const std::string& key,
                              const at::Tensor& tensor, const std::string& origin) {
  const std::string rest = key.substr(std::strlen(kAdaptFormerPrefix));
  const size_t dot = rest.find('.');
  const std::string digits = rest.substr(0, dot);
  const auto& names = adaptformer_tensor_names();
  const auto slot = std::find(names.begin(), names.end(), dot == std::string::npos ? "" : rest.substr(dot + 1));
  if (digits.empty() || digits.size() > 6 || digits.find_first_not_of("0123456789") != std::string::npos ||
      slot == names.end() || !tensor.is_floating_point())
    throw InputError(origin + ": tensor " + key + " is not an AdaptFormer tensor (adaptformer.<block>.down.weight, "
                     "down.bias, up.weight or up.bias)");
  auto& block = blocks[std::stoll(digits)];
  block.resize(names.size());
  block[static_cast<size_t>(slot - names.begin())] = tensor.to(at::kFloat);
}

// Method adaptformer's adapters: all four tensors of blocks 0, 1, ... without gaps; none for other methods.
void read_mlp_adapters(Adapter& a, const std::map<int64_t, std::vector<at::Tensor>>& blocks, const std::string& origin) {
  if (a.method != Method::kAdaptFormer) {
    if (!blocks.empty()) throw InputError(origin + " holds AdaptFormer adapters, but its method is " + method_name(a.method));
    return;
  }
  if (blocks.empty()) throw InputError(origin + ": method adaptformer but no adapters stored");
  int64_t next = 0;
  for (const auto& [block, tensors] : blocks) {
    if (block != next) throw InputError(origin + ": the adapter of block " + std::to_string(next) + " is missing");
    for (size_t k = 0; k < tensors.size(); ++k)
      if (!tensors[k].defined())
        throw InputError(origin + ": the adapter of block " + std::to_string(block) + " has no " + adaptformer_tensor_names()[k]);
    a.mlp_adapters.push_back(tensors);
    ++next;
  }
}

// Tensors: adapters by key, the head, full weights, prompts, AdaptFormer's adapters.
void read_tensors(Adapter& a, const safetensors::Contents& contents, const std::string& origin) {
  const PeftPatterns alpha_patterns(a.lora.alpha_pattern, "alpha_pattern", origin);
  // Ranks come from the tensors' shapes; the keys must still be patterns PEFT can read.
  PeftPatterns(a.lora.rank_pattern, "rank_pattern", origin);
  const AdapterVariant* variant = find_variant(a.lora.variant);
  std::map<TargetKey, LoraTarget> found;
  const std::string head_prefix = std::string(kKeyPrefix) + kHeadModule + ".";
  std::map<int64_t, at::Tensor> prompt_sets;  // by block; -1: the shallow set
  std::map<int64_t, std::vector<at::Tensor>> mlp_adapters;  // by block
  for (const auto& [key, tensor] : contents.tensors) {
    if (key.size() > kMaxNameLength)
      throw InputError(origin + ": a tensor name is " + std::to_string(key.size()) + " bytes long (limit " +
                       std::to_string(kMaxNameLength) + "); not an adapter file");
    check_finite(tensor, origin, key);
    if (const int64_t block = prompt_block(key); block != kNotPrompt) {
      prompt_sets[block] = tensor.to(at::kFloat);
      continue;
    }
    if (key.rfind(kAdaptFormerPrefix, 0) == 0) {
      place_mlp_adapter_tensor(mlp_adapters, key, tensor, origin);
      continue;
    }
    std::string name = key;
    if (name.compare(0, std::strlen(kKeyPrefix), kKeyPrefix) == 0) name = name.substr(std::strlen(kKeyPrefix));
    const LoraKey k = parse_lora_key(name);
    if (!k.tensor.empty()) place_adapter_tensor(found, k, key, tensor, variant, origin);
    else if (key == head_prefix + "weight") a.head_weight = tensor.to(at::kFloat);
    else if (key == head_prefix + "bias") a.head_bias = tensor.to(at::kFloat);
    else a.full_weights[name] = tensor;
  }
  for (auto& [id, t] : found) {
    complete_target(t, a, alpha_patterns, origin);
    a.targets.push_back(std::move(t));
  }
  read_prompt_sets(a, prompt_sets, origin);
  read_mlp_adapters(a, mlp_adapters, origin);
}

// loratune's metadata lists every target: exact alphas as recorded, slice by slice, and the text tower's targets.
void apply_recorded_targets(Adapter& a, const json& meta, const std::string& origin) {
  for (const auto& jt : meta.at("targets")) {
    const std::string module = jt.at("module").get<std::string>();
    const TargetKey key{module, jt.at("param").get<std::string>(), jt.at("slice").get<std::string>()};
    auto match = std::find_if(a.targets.begin(), a.targets.end(), [&](const LoraTarget& t) { return t == key; });
    if (match == a.targets.end()) throw InputError(origin + ": adapter " + module + " is listed but has no tensors");
    match->alpha = jt.at("alpha").get<double>();
    if (!match->variant->low_rank() && jt.contains("in_features") && jt.at("in_features").is_number_integer())
      match->in_features = jt.at("in_features").get<int64_t>();  // no A to tell it; binding checks it again
    if (!(match->alpha > 0)) throw InputError(origin + ": adapter " + module + " has alpha <= 0");
  }
  if (a.targets.size() != meta.at("targets").size())
    throw InputError(origin + ": the file holds adapter tensors its metadata does not list");
  std::set<TargetKey> text;
  for (const auto& jt : meta.at("targets"))
    if (jt.contains("tower") && jt.at("tower") == "text")
      text.insert(TargetKey{jt.at("module").get<std::string>(), jt.at("param").get<std::string>(),
                            jt.at("slice").get<std::string>()});
  const auto image_end = std::stable_partition(a.targets.begin(), a.targets.end(),
                                               [&](const LoraTarget& t) { return text.count(t) == 0; });
  std::move(image_end, a.targets.end(), std::back_inserter(a.text_targets));
  a.targets.erase(image_end, a.targets.end());
}

// The classifier head: both tensors, [classes, features] and [classes], one name per class (named if none stored).
void check_head(Adapter& a, const std::string& origin) {
  if (a.head_weight.defined() != a.head_bias.defined())
    throw InputError(origin + ": classifier head is incomplete (weight and bias must both be present)");
  if (!a.head_weight.defined()) return;
  if (a.head_weight.dim() != 2 || a.head_bias.dim() != 1 || a.head_bias.size(0) != a.head_weight.size(0))
    throw InputError(origin + ": classifier weight must be [classes, features] and its bias [classes]");
  if (!a.classes.empty() && static_cast<int64_t>(a.classes.size()) != a.head_weight.size(0))
    throw InputError(origin + ": " + std::to_string(a.classes.size()) + " class names for a head of " +
                     std::to_string(a.head_weight.size(0)) + " outputs");
  if (a.classes.empty())
    for (int64_t i = 0; i < a.head_weight.size(0); ++i) a.classes.push_back("class_" + std::to_string(i));
}

}  // namespace

Adapter load_adapter(const fs::path& path) {
  std::error_code ec;
  const bool folder = fs::is_directory(path, ec);
  const AdapterFiles files = locate_adapter(path);
  const auto contents = safetensors::read(files.weights);
  const std::string origin = path.string();
  check_envelope(contents, origin);
  Adapter a;
  const json meta = read_settings(a, contents, files, folder, origin);
  check_lora_settings(a.lora, origin);
  read_tensors(a, contents, origin);
  if (!meta.is_null()) apply_recorded_targets(a, meta, origin);
  check_head(a, origin);
  if (a.method == Method::kFull && a.full_weights.empty()) throw InputError(origin + ": method full but no base weights stored");
  if (folder && fs::exists(path / kInitialHeadName, ec)) read_initial_head(a, path / kInitialHeadName);
  return a;
}

}  // namespace loratune
