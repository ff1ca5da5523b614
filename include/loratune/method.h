// What training changes: adapters on a frozen base, every weight, or only the classification head.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "loratune/named_enum.h"

namespace loratune {

enum class Method {
  kLora,         // adapters on the base, base frozen
  kFull,         // every base weight trained
  kLinearProbe,  // only the head trained, base frozen
};

template <>
struct NamedEnum<Method> {
  static constexpr std::pair<Method, const char*> names[] = {
      {Method::kLora, "lora"}, {Method::kFull, "full"}, {Method::kLinearProbe, "linear_probe"}};
};

// "lora", "full", "linear_probe"; parse_method throws InputError for anything else.
inline std::vector<std::string> method_names() { return enum_names<Method>(); }
inline Method parse_method(const std::string& name) { return parse_enum<Method>(name, "method"); }
inline std::string method_name(Method method) { return enum_name(method); }

}  // namespace loratune
