// What training changes: adapters on a frozen base, learned prompt tokens before its blocks, every weight, or only
// the classification head.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "loratune/named_enum.h"

namespace loratune {

enum class Method {
  kLora,         // adapters on the base, base frozen
  kFull,         // every base weight trained
  kLinearProbe,  // only the head trained, base frozen
  kVpt,          // prompt tokens appended to the blocks' input (prompt_tokens.h), base frozen
  kAdaptFormer,  // bottleneck adapters parallel to each block's MLP (mlp_adapters.h), base frozen
};

template <>
struct NamedEnum<Method> {
  static constexpr std::pair<Method, const char*> names[] = {
      {Method::kLora, "lora"},         {Method::kFull, "full"}, {Method::kLinearProbe, "linear_probe"},
      {Method::kVpt, "vpt"}, {Method::kAdaptFormer, "adaptformer"}};
};

// "lora", "full", "linear_probe", "vpt", "adaptformer"; parse_method throws InputError for anything else.
inline std::vector<std::string> method_names() { return enum_names<Method>(); }
inline Method parse_method(const std::string& name) { return parse_enum<Method>(name, "method"); }
inline std::string method_name(Method method) { return enum_name(method); }
// Whether the base's own weights stay as they are (everything but full fine-tuning): they may be quantised, offloaded
// or kept in 16 bits.
inline bool freezes_base(Method method) { return method != Method::kFull; }
// Whether something trains inside the frozen base's forward (adapters, prompts), not just the head after it: the
// methods under which frozen weights may be quantised or offloaded.
inline bool adapts_frozen_base(Method method) {
  return method == Method::kLora || method == Method::kVpt || method == Method::kAdaptFormer;
}

// Method adaptformer's adapters (mlp_adapters.h): x' -> scale * Up(ReLU(Down(x'))) added to the MLP's output, x' the
// MLP's input before its LayerNorm (Chen et al. 2022).
struct AdaptFormerSettings {
  int64_t bottleneck = 64;  // Down's output width
  double scale = 0.1;       // the paper's s
  bool sequential = false;  // its ffn_option sequential: the adapter reads the MLP's output y instead of x'
};
// The tensors of one block's adapter, in order: Down [bottleneck, width], its bias, Up [width, bottleneck], its bias
// (nn.Linear's layout).
inline const std::vector<std::string>& adaptformer_tensor_names() {
  static const std::vector<std::string> names = {"down.weight", "down.bias", "up.weight", "up.bias"};
  return names;
}

// Method vpt's prompt tokens (prompt_tokens.h).
struct PromptSettings {
  int64_t tokens = 10;  // prompt tokens per set
  bool deep = true;     // a set before every block (VPT-deep); false: one set before the first block (VPT-shallow)
};

}  // namespace loratune
