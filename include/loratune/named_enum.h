// Enumerations written by name in configuration files and on the command line. Each enum lists its names once, in a
// NamedEnum specialisation beside its declaration; parsing, printing and the configuration schema's choices ask it.
#pragma once

#include <string>
#include <vector>

#include "loratune/errors.h"

namespace loratune {

// Specialise for an enum E: `static constexpr std::pair<E, const char*> names[] = {{E::kA, "a"}, ...};`
template <typename E>
struct NamedEnum;

template <typename E>
std::vector<std::string> enum_names() {
  std::vector<std::string> out;
  for (const auto& [value, name] : NamedEnum<E>::names) out.push_back(name);
  return out;
}

template <typename E>
std::string enum_name(E value) {
  for (const auto& [v, name] : NamedEnum<E>::names)
    if (v == value) return name;
  return "?";
}

// InputError "<what> must be a, b or c (got "x")".
[[noreturn]] void throw_unknown_name(const std::string& what, const std::string& name,
                                     const std::vector<std::string>& names);

// The value named `name`; InputError for any other name.
template <typename E>
E parse_enum(const std::string& name, const std::string& what) {
  for (const auto& [value, n] : NamedEnum<E>::names)
    if (name == n) return value;
  throw_unknown_name(what, name, enum_names<E>());
}

}  // namespace loratune
