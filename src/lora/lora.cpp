// Target keys and targets, and the rules of LoRA settings.
#include "loratune/lora.h"

#include <cmath>

#include "common/strings.h"
#include "lora/lora_rules.h"
#include "loratune/adapter_init.h"
#include "loratune/adapter_variant.h"
#include "loratune/errors.h"

namespace loratune {

std::string TargetKey::name() const { return module + "." + param + (slice.empty() ? "" : "." + slice); }

std::pair<int64_t, int64_t> TargetKey::rows_in(int64_t weight_rows) const {
  if (slice.empty()) return {0, weight_rows};
  const int64_t third = weight_rows / 3;
  return {(slice == "q" ? 0 : slice == "k" ? 1 : 2) * third, third};
}

std::string TargetKey::bias_param() const {
  const std::string weight = "weight";
  const bool suffix = param.size() >= weight.size() && param.compare(param.size() - weight.size(), weight.size(), weight) == 0;
  return suffix ? param.substr(0, param.size() - weight.size()) + "bias" : param + "_bias";
}

bool TargetKey::operator<(const TargetKey& o) const {
  return std::tie(module, param, slice) < std::tie(o.module, o.param, o.slice);
}

bool TargetKey::operator==(const TargetKey& o) const {
  return module == o.module && param == o.param && slice == o.slice;
}

double LoraTarget::scale() const {
  if (!variant->low_rank()) return 1.0;
  return rslora ? alpha / std::sqrt(static_cast<double>(rank)) : alpha / rank;
}

std::string LoraTarget::describe() const {
  return module + (param == "weight" ? "" : "." + param) + (slice.empty() ? "" : "[" + slice + "]") + " [" +
         std::to_string(rows) + (in_features > 0 ? "x" + std::to_string(in_features) : "") + "]" +
         (variant->low_rank() ? " r=" + std::to_string(rank) : "") +
         (variant == &lora_variant() ? "" : " " + variant->name());
}

bool LoraTarget::trains(size_t k) const { return variant->tensor_specs().at(k).trainable; }

std::string LoraTarget::tensor_name(size_t k) const { return "lora." + name() + "." + variant->tensor_specs().at(k).name; }

void check_lora_settings(const LoraSettings& s, const std::string& origin) {
  auto check = [&](const char* key, const Range& range, double value) {
    if (!range.contains(value))
      throw InputError(origin + ": lora." + key + " must be " + range.text() + " (got " + c10::str(value) + ")");
  };
  check("rank", lora_rules::kRank, static_cast<double>(s.rank));
  check("alpha", lora_rules::kAlpha, s.alpha);
  check("dropout", lora_rules::kDropout, s.dropout);
  for (const auto& [pattern, rank] : s.rank_pattern) check("rank_pattern values", lora_rules::kRank, static_cast<double>(rank));
  for (const auto& [pattern, alpha] : s.alpha_pattern) check("alpha_pattern values", lora_rules::kAlpha, alpha);
  if (s.last_blocks >= 0) check("last_blocks", lora_rules::kLastBlocks, static_cast<double>(s.last_blocks));
  if (find_variant(s.variant) == nullptr)
    throw InputError(origin + ": lora.variant must be " + choices_text(variant_names()) + " (got \"" + s.variant + "\")");
  if (find_adapter_init(s.init) == nullptr)
    throw InputError(origin + ": lora.init must be " + choices_text(adapter_init_names()) + " (got \"" + s.init + "\")");
  if (!variant_by_name(s.variant).low_rank() && s.init != default_adapter_init().name())
    throw InputError(origin + ": lora.init \"" + s.init + "\" starts LoRA's A and B; lora.variant " + s.variant +
                     " has none (remove lora.init)");
}

}  // namespace loratune
