// Rules a setting's value follows, stated once: config key records carry them (and their help text is made from
// them), and every check of the same setting (a config, a target list, an adapter file) uses the same rule.
#pragma once

#include <limits>
#include <string>
#include <vector>

#include "common/strings.h"

namespace loratune {

// A numeric range with open or closed ends.
struct Range {
  double low = -std::numeric_limits<double>::infinity();
  double high = std::numeric_limits<double>::infinity();
  bool low_open = false, high_open = false;

  static constexpr Range any() { return {}; }
  static constexpr Range at_least(double low) { return {low, std::numeric_limits<double>::infinity(), false, false}; }
  static constexpr Range positive() { return {0, std::numeric_limits<double>::infinity(), true, false}; }
  // [low, high), [low, high] or (low, high) as the flags say.
  static constexpr Range between(double low, double high, bool low_open, bool high_open) {
    return {low, high, low_open, high_open};
  }

  bool bounded() const { return low > -std::numeric_limits<double>::infinity() || high < std::numeric_limits<double>::infinity(); }
  bool contains(double v) const {
    return (low_open ? v > low : v >= low) && (high_open ? v < high : v <= high);  // NaN is in no range
  }
  // "positive", "at least 1", "in [0, 1)".
  std::string text() const {
    if (high == std::numeric_limits<double>::infinity()) {
      if (low == 0 && low_open) return "positive";
      return (low_open ? "greater than " : "at least ") + number(low);
    }
    return std::string("in ") + (low_open ? "(" : "[") + number(low) + ", " + number(high) + (high_open ? ")" : "]");
  }

 private:
  static std::string number(double v) {
    std::string s = std::to_string(v);
    s.erase(s.find_last_not_of('0') + 1);
    if (s.back() == '.') s.pop_back();
    return s;
  }
};

// "a or b", "a, b or c": the choices of a setting as messages name them.
inline std::string choices_text(const std::vector<std::string>& choices) {
  if (choices.size() < 2) return join(choices);
  const std::vector<std::string> head(choices.begin(), choices.end() - 1);
  return join(head) + " or " + choices.back();
}

}  // namespace loratune
