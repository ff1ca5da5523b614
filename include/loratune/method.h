// What training changes: adapters on a frozen base, every weight, or only the classification head.
#pragma once

#include <string>
#include <vector>

namespace loratune {

enum class Method {
  kLora,         // adapters on the base, base frozen
  kFull,         // every base weight trained
  kLinearProbe,  // only the head trained, base frozen
};

// "lora", "full", "linear_probe"; parse_method throws InputError for anything else.
const std::vector<std::string>& method_names();
Method parse_method(const std::string& name);
std::string method_name(Method method);

}  // namespace loratune
