#include "loratune/method.h"

#include "common/value_rules.h"
#include "loratune/errors.h"

namespace loratune {

const std::vector<std::string>& method_names() {
  static const std::vector<std::string> names = {"lora", "full", "linear_probe"};
  return names;
}

Method parse_method(const std::string& name) {
  for (const Method m : {Method::kLora, Method::kFull, Method::kLinearProbe})
    if (name == method_name(m)) return m;
  throw InputError("method must be " + choices_text(method_names()) + " (got \"" + name + "\")");
}

std::string method_name(Method method) {
  switch (method) {
    case Method::kLora: return "lora";
    case Method::kFull: return "full";
    case Method::kLinearProbe: return "linear_probe";
  }
  return "?";
}

}  // namespace loratune
