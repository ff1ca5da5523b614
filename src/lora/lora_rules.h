// The rules of LoRA settings, stated once: the config's key records (and `--help-config`) and
// check_lora_settings (config, target lists, adapter files) read them.
#pragma once

#include "common/value_rules.h"

namespace loratune::lora_rules {

inline constexpr Range kRank = Range::at_least(1);
inline constexpr Range kAlpha = Range::positive();
inline constexpr Range kDropout = Range::between(0, 1, false, true);
inline constexpr Range kLastBlocks = Range::at_least(1);

}  // namespace loratune::lora_rules
