#include "loratune/method.h"

#include "loratune/errors.h"

namespace loratune {

Method parse_method(const std::string& name) {
  if (name == "lora") return Method::kLora;
  if (name == "full") return Method::kFull;
  if (name == "linear_probe") return Method::kLinearProbe;
  throw InputError("method must be lora, full or linear_probe (got \"" + name + "\")");
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
