#include <ATen/core/grad_mode.h>

#include <cmath>
#include <memory>

#include "common/pattern_match.h"
#include "loratune/errors.h"
#include "lora/adapter_host.h"
#include "loratune/targets.h"
#include "common/strings.h"

namespace loratune {
namespace {

struct Pattern {
  std::string text;  // as written
  std::string name;  // suffix or regex
  std::shared_ptr<const PatternMatcher> regex;  // "re:" patterns
  std::vector<std::string> slices;

  bool matches(const std::string& path) const {
    if (regex) return regex->full_match(path);
    return path == name || (path.size() > name.size() && path.compare(path.size() - name.size(), name.size(), name) == 0 &&
                            path[path.size() - name.size() - 1] == '.');
  }
};

Pattern parse_pattern(const std::string& text) {
  Pattern p;
  p.text = text;
  std::string body = text;
  const size_t colon = text.rfind(':');
  if (colon != std::string::npos) {
    const std::string tail = text.substr(colon + 1);
    bool all_slices = !tail.empty();
    std::vector<std::string> slices;
    size_t start = 0;
    while (start <= tail.size()) {
      const size_t comma = tail.find(',', start);
      const std::string s = tail.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
      if (s != "q" && s != "k" && s != "v") all_slices = false;
      slices.push_back(s);
      if (comma == std::string::npos) break;
      start = comma + 1;
    }
    if (all_slices) body = text.substr(0, colon), p.slices = slices;
  }
  if (body.compare(0, 3, "re:") == 0) {
    p.name = body.substr(3);
    p.regex = std::make_shared<const PatternMatcher>(p.name, "LoRA target \"" + text.substr(0, 80) + "\"");
  } else {
    p.name = body;
  }
  if (p.name.empty()) throw InputError("LoRA target \"" + text + "\" names no module");
  return p;
}

// A weight that can carry an adapter.
struct Weight {
  std::string module, param;
  int64_t rows, cols;
};

std::string last_name(const std::string& path) {
  const size_t dot = path.rfind('.');
  return dot == std::string::npos ? path : path.substr(dot + 1);
}

std::vector<Weight> adaptable_weights(const torch::jit::Module& root) {
  std::vector<Weight> out;
  for (const auto& nm : root.named_modules()) {
    for (const char* param : {"weight", "in_proj_weight"}) {
      if (!nm.value.hasattr(param)) continue;
      const auto v = nm.value.attr(param);
      if (!v.isTensor()) continue;
      const at::Tensor w = v.toTensor();
      if (w.dim() != 2 || !w.is_floating_point()) continue;
      out.push_back({nm.name, param, w.size(0), w.size(1)});
    }
  }
  return out;
}

constexpr const char* kAllLinear = "all-linear";
const std::set<std::string> kSeparateQV = {"query", "value", "q_proj", "v_proj"};
const std::set<std::string> kFusedQKV = {"qkv", "qkv_proj", "in_proj", "c_attn"};

bool fused(const Weight& w) { return w.rows == 3 * w.cols; }

}  // namespace

std::vector<std::string> candidate_modules(const torch::jit::Module& module) {
  std::vector<std::string> out;
  for (const auto& w : adaptable_weights(module))
    out.push_back(w.module + (w.param == "weight" ? "" : " (" + w.param + ")") + " [" + std::to_string(w.rows) + "x" +
                  std::to_string(w.cols) + "]");
  return out;
}

namespace {

// A weight chosen for adapters, whole (no slices) or by its q/k/v slices.
using Choice = std::pair<Weight, std::vector<std::string>>;

// A module with both `weight` and `in_proj_weight` is adapted through in_proj_weight.
bool shadowed_by_in_proj(const Weight& w, const std::vector<Weight>& weights) {
  return w.param == "weight" && std::any_of(weights.begin(), weights.end(), [&](const Weight& o) {
           return o.module == w.module && o.param == "in_proj_weight";
         });
}

// No lora.targets: every attention query and value projection, separate or the q/v slices of a fused one.
std::vector<Choice> query_value_weights(const std::vector<Weight>& weights, const torch::jit::Module& module) {
  std::vector<Choice> chosen;
  for (const auto& w : weights) {
    const std::string name = last_name(w.module);
    if (w.param == "weight" && kSeparateQV.count(name)) chosen.push_back({w, {}});
    else if (fused(w) && (w.param == "in_proj_weight" || kFusedQKV.count(name))) chosen.push_back({w, {"q", "v"}});
  }
  if (chosen.empty())
    throw InputError("found no attention query/value projections to adapt (looked for modules named query/value, "
                     "q_proj/v_proj, or fused qkv/in_proj weights); set lora.targets. Candidates: " +
                     join(candidate_modules(module), ", ", 12));
  return chosen;
}

// "all-linear": every 2-D weight the blocks read.
std::vector<Choice> all_linear_weights(const std::vector<Weight>& weights, const torch::jit::Module& module,
                                       const std::string& blocks_path) {
  if (blocks_path.empty())
    throw InputError("lora.targets \"all-linear\" needs a model with a blocks structure (export it with "
                     "scripts/export/); name the modules instead");
  std::vector<Choice> chosen;
  for (const auto& w : weights)
    if (w.module.compare(0, blocks_path.size() + 1, blocks_path + ".") == 0 && !shadowed_by_in_proj(w, weights) &&
        weight_is_read(module, w.module, w.param))
      chosen.push_back({w, {}});
  return chosen;
}

// One lora.targets entry: the weights its pattern matches (InputError, with the nearest name, when none).
std::vector<Choice> matching_weights(const std::string& text, const std::vector<Weight>& weights,
                                     const torch::jit::Module& module) {
  const Pattern p = parse_pattern(text);
  std::vector<Choice> chosen;
  for (const auto& w : weights) {
    if (!p.matches(w.module) || shadowed_by_in_proj(w, weights)) continue;
    if (!p.slices.empty() && !fused(w))
      throw InputError("LoRA target \"" + text + "\" asks for q/k/v slices, but " + w.module + " has a [" +
                       std::to_string(w.rows) + "x" + std::to_string(w.cols) +
                       "] weight, not a fused [3C x C] one; drop the \":" + join(p.slices, ",") + "\"");
    chosen.push_back({w, p.slices});
  }
  if (chosen.empty()) {
    std::vector<std::string> names;
    for (const auto& w : weights) names.push_back(w.module), names.push_back(last_name(w.module));
    const std::string close = nearest(p.name, names);
    throw InputError("LoRA target \"" + text + "\" matches no module" +
                     (close.empty() ? "" : " (did you mean \"" + close + "\"?)") +
                     ". Candidates: " + join(candidate_modules(module), ", ", 12));
  }
  return chosen;
}

// lora.rank_pattern / lora.alpha_pattern: the value of the last pattern that applies to a module (and slice).
template <typename T>
class PerModule {
 public:
  PerModule(const std::map<std::string, T>& values, const char* key, const char* requirement) : values_(values) {
    for (const auto& [k, v] : values) {
      if (!(v > 0)) throw InputError(std::string("lora.") + key + "[\"" + k + "\"] must be " + requirement);
      patterns_.push_back(parse_pattern(k));
    }
  }
  T value(const std::string& module, const std::string& slice, T fallback) const {
    for (const auto& p : patterns_)
      if (p.matches(module) && (p.slices.empty() || std::find(p.slices.begin(), p.slices.end(), slice) != p.slices.end()))
        fallback = values_.at(p.text);
    return fallback;
  }

 private:
  const std::map<std::string, T>& values_;
  std::vector<Pattern> patterns_;
};

// The chosen weights as targets, one per slice, with their ranks and alphas; each weight once.
std::vector<LoraTarget> targets_of(const std::vector<Choice>& chosen, const LoraSettings& settings,
                                   const AdapterVariant& variant) {
  const PerModule<int64_t> ranks(settings.rank_pattern, "rank_pattern", "a positive integer");
  const PerModule<double> alphas(settings.alpha_pattern, "alpha_pattern", "positive");
  std::vector<LoraTarget> out;
  std::set<TargetKey> seen;
  for (const auto& [w, slices] : chosen) {
    for (const auto& slice : slices.empty() ? std::vector<std::string>{""} : slices) {
      LoraTarget t;
      t.module = w.module;
      t.param = w.param;
      t.slice = slice;
      t.in_features = w.cols;
      std::tie(t.row_begin, t.rows) = t.rows_in(w.rows);
      t.rank = variant.low_rank() ? ranks.value(w.module, slice, settings.rank) : 0;
      t.alpha = alphas.value(w.module, slice, settings.alpha);
      t.rslora = settings.rslora;
      t.variant = &variant;
      if (!seen.insert(t).second) continue;  // several patterns may select the same weight
      if (!slice.empty() && std::any_of(out.begin(), out.end(), [&](const LoraTarget& o) {
            return o.module == t.module && o.param == t.param && o.slice.empty();
          }))
        throw InputError("LoRA targets select " + w.module + " both whole and by slices; choose one");
      out.push_back(std::move(t));
    }
  }
  return out;
}

}  // namespace

std::vector<LoraTarget> resolve_targets(const torch::jit::Module& module, const LoraSettings& settings,
                                        const std::string& blocks_path) {
  check_lora_settings(settings, "LoRA settings");
  const AdapterVariant& variant = variant_by_name(settings.variant);
  const auto weights = adaptable_weights(module);
  std::vector<Choice> chosen;
  if (settings.targets.empty()) chosen = query_value_weights(weights, module);
  for (const auto& text : settings.targets) {
    const auto more = text == kAllLinear ? all_linear_weights(weights, module, blocks_path)
                                         : matching_weights(text, weights, module);
    chosen.insert(chosen.end(), more.begin(), more.end());
  }
  std::vector<LoraTarget> out = targets_of(chosen, settings, variant);
  for (const auto& t : out) {
    if (std::any_of(out.begin(), out.end(), [&](const LoraTarget& o) { return o.module == t.module && o.param != t.param; }))
      throw InputError("LoRA targets select two different weights of module " + t.module + "; adapt one of them");
    if (variant.low_rank() && t.rank > std::min(t.rows, t.in_features))
      throw InputError("LoRA rank " + std::to_string(t.rank) + " is larger than the weight " + t.describe() + " allows");
  }
  std::sort(out.begin(), out.end(), [](const LoraTarget& a, const LoraTarget& b) {
    return a.module != b.module ? natural_less(a.module, b.module) : a.row_begin < b.row_begin;
  });
  return out;
}

void init_adapter_tensors(std::vector<LoraTarget>& targets, const torch::jit::Module& module,
                          const AdapterInit& start) {
  for (auto& t : targets) {
    torch::jit::Module owner = module;
    for (size_t start = 0; start < t.module.size();) {
      const size_t dot = t.module.find('.', start);
      owner = owner.attr(t.module.substr(start, dot == std::string::npos ? std::string::npos : dot - start)).toModule();
      start = dot == std::string::npos ? t.module.size() : dot + 1;
    }
    const at::Tensor rows = owner.attr(t.param).toTensor().detach().narrow(0, t.row_begin, t.rows);
    t.variant->init(t, rows, start);
    if (!start.takes_from_weight() || !t.variant->low_rank()) continue;
    at::NoGradGuard no_grad;
    t.taken_A = t.A().detach().clone();
    t.taken_B = t.B().detach().clone();
    rows.copy_(rows.to(at::kFloat) - at::mm(t.taken_B, t.taken_A) * t.scale());
  }
}

}  // namespace loratune
