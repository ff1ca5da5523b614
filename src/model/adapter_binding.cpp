#include "loratune/adapter_binding.h"

#include "loratune/adapter_init.h"
#include "loratune/errors.h"

#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <iterator>

using nlohmann::json;
namespace fs = std::filesystem;

namespace loratune {

std::string strip_prefix(const std::string& path, const std::string& prefix) {
  if (prefix.empty()) return path;
  if (path.compare(0, prefix.size(), prefix) != 0)
    throw InputError("module " + path + " is outside the model's prefix \"" + prefix + "\"");
  return path.substr(prefix.size());
}

std::string add_prefix(const std::string& path, const std::string& prefix) { return prefix + path; }

Adapter adapter_from_model(const Model& model, const std::vector<std::string>& classes, json training) {
  Adapter a;
  const std::string& prefix = model.bundle().info.module_prefix;
  a.method = model.method();
  a.lora = model.lora_settings();
  if (model.method() == Method::kLora && !model.dropout_applies()) a.lora.dropout = 0;  // what training applied
  if (model.method() == Method::kLora)
    for (const auto& t : model.adapters()) {
      LoraTarget c = on_unmodified_base(t);
      c.module = strip_prefix(t.module, prefix);
      for (auto& tensor : c.tensors) tensor = tensor.detach().to(at::kCPU);
      a.targets.push_back(std::move(c));
    }
  if (model.method() == Method::kVpt) {
    a.vpt = model.prompts().settings();
    for (const auto& set : model.prompts().sets()) a.prompt_sets.push_back(set.detach().to(at::kCPU));
  }
  if (model.method() == Method::kAdaptFormer) {
    a.adaptformer = model.mlp_adapters().settings();
    for (const auto& block : model.mlp_adapters().tensors()) {
      a.mlp_adapters.emplace_back();
      for (const auto& t : block) a.mlp_adapters.back().push_back(t.detach().to(at::kCPU));
    }
  }
  if (model.method() == Method::kFull) {
    auto module = model.bundle().module;
    for (const auto& p : module.named_parameters()) a.full_weights[strip_prefix(p.name, prefix)] = p.value.detach().to(at::kCPU);
  }
  if (model.method() == Method::kLora && model.has_text_tower()) {
    const Bundle& text = model.text_bundle();
    for (const auto& t : model.text_adapters()) {
      LoraTarget c = on_unmodified_base(t);
      c.module = strip_prefix(t.module, text.info.module_prefix);
      for (auto& tensor : c.tensors) tensor = tensor.detach().to(at::kCPU);
      a.text_targets.push_back(std::move(c));
    }
    a.text_base_fingerprint = text.fingerprint;
    a.text_base_name = text.info.name.empty() ? text.path.filename().string() : text.info.name;
  }
  // Targets whose start took a part of the weight are written as changes of the unmodified base.
  if (std::any_of(model.adapters().begin(), model.adapters().end(), [](const LoraTarget& t) { return t.taken_A.defined(); }))
    a.lora = settings_on_unmodified_base(a.lora);
  a.head_weight = model.head().weight().detach().to(at::kCPU);
  a.normalize_features = model.head().normalize_features();
  a.head_bias = model.head().bias().detach().to(at::kCPU);
  a.classes = classes;
  a.base_fingerprint = model.bundle().fingerprint;
  a.base_name = model.bundle().info.name.empty() ? model.bundle().path.filename().string() : model.bundle().info.name;
  a.training = std::move(training);
  return a;
}

namespace {

bool has_module(const Bundle& bundle, const std::string& path) {
  try {
    submodule_at(bundle.module, path);
    return true;
  } catch (const InputError&) {
    return false;
  }
}

std::vector<LoraTarget> bind_target_list(const std::vector<LoraTarget>& targets, const Bundle& bundle,
                                         const std::string& origin) {
  std::vector<LoraTarget> out;
  for (const auto& t : targets) {
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
    const int64_t rows = b.rows_in(w.size(0)).second;
    // A variant without A has no tensor that tells in_features: files written by another tool leave them 0.
    if (!b.variant->low_rank() && b.in_features == 0 && w.dim() == 2) b.in_features = w.size(1);
    if (w.dim() != 2 || w.size(1) != b.in_features || rows != b.rows || (!b.slice.empty() && w.size(0) % 3 != 0))
      throw InputError(origin + " was made for another base: adapter " + t.describe() + " does not fit the weight " +
                       b.module + " [" + std::to_string(w.size(0)) + "x" + std::to_string(w.size(1)) + "]");
    b.row_begin = b.rows_in(w.size(0)).first;
    out.push_back(std::move(b));
  }
  return out;
}

}  // namespace

std::vector<LoraTarget> bind_targets(const Adapter& a, const Bundle& bundle, const std::string& origin) {
  return bind_target_list(a.targets, bundle, origin);
}

std::vector<LoraTarget> bind_text_targets(const Adapter& a, const Bundle& text, const std::string& origin) {
  if (!a.text_base_fingerprint.empty() && a.text_base_fingerprint != text.fingerprint)
    throw InputError(origin + " was trained with a different text tower (fingerprint " + a.text_base_fingerprint +
                     " \"" + a.text_base_name + "\", " + text.path.string() + " has " + text.fingerprint + ")");
  return bind_target_list(a.text_targets, text, origin);
}

bool has_targets_outside(const Adapter& a, const Bundle& image) {
  return std::any_of(a.targets.begin(), a.targets.end(), [&](const LoraTarget& t) {
    return !has_module(image, add_prefix(t.module, image.info.module_prefix));
  });
}

void route_text_targets(Adapter& a, const Bundle& image, const Bundle& text) {
  const auto text_begin = std::stable_partition(a.targets.begin(), a.targets.end(), [&](const LoraTarget& t) {
    return has_module(image, add_prefix(t.module, image.info.module_prefix)) ||
           !has_module(text, add_prefix(t.module, text.info.module_prefix));
  });
  std::move(text_begin, a.targets.end(), std::back_inserter(a.text_targets));
  a.targets.erase(text_begin, a.targets.end());
}

void check_adapter_base(const Adapter& a, const Bundle& bundle, const std::string& origin) {
  const bool other_base = !a.base_fingerprint.empty() && a.base_fingerprint != bundle.fingerprint;
  // A merged file is a base of its own only for adapters trained on it.
  if ((other_base && bundle.info.extra.contains("merged_into")) || bundle.info.kind == "classifier")
    throw InputError(bundle.path.string() + " is already merged (" + bundle.info.name + "): " + origin +
                     " applies to the base model it was trained on; give that one");
  if (other_base)
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

void apply_adapter(Model& model, const Adapter& given, const std::string& origin) {
  Adapter a = given;
  if (model.has_text_tower()) route_text_targets(a, model.bundle(), model.text_bundle());
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
  if (!a.prompt_sets.empty()) model.set_prompts(a.vpt, a.prompt_sets, origin);
  else model.clear_prompts();
  if (!a.mlp_adapters.empty()) model.set_mlp_adapters(a.adaptformer, a.mlp_adapters, origin);
  else if (model.mlp_adapters().defined()) model.clear_mlp_adapters();
  // Without the text tower, text adapters live on in the head they made.
  if (model.has_text_tower() && !a.text_targets.empty())
    model.set_text_adapters(bind_text_targets(a, model.text_bundle(), origin));
  if (a.head_weight.defined()) model.head().set(a.head_weight, a.head_bias);
  model.head().set_normalize_features(a.normalize_features);
}

}  // namespace loratune
