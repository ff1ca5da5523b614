#include "loratune/named_enum.h"

#include "common/value_rules.h"

namespace loratune {

void throw_unknown_name(const std::string& what, const std::string& name, const std::vector<std::string>& names) {
  throw InputError(what + " must be " + choices_text(names) + " (got \"" + name + "\")");
}

}  // namespace loratune
