// Regular expressions for patterns that come from configs and adapter files (untrusted input): parsed without deep
// recursion and matched in time linear in the text (Thompson NFA simulation), so no pattern can hang or overflow the
// stack the way backtracking matchers (std::regex) do on "(a*)*c" or deep nesting.
//
// Syntax (a subset of ECMAScript): literals, \-escapes, . [abc] [^a-z] \d \w \s, groups (...) and (?:...),
// alternation |, quantifiers * + ? {n} {n,} {n,m}; ^ at the start and $ at the end are allowed (matches are whole
// strings anyway). Back-references and look-arounds are refused with a message.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace loratune {

class PatternMatcher {
 public:
  static constexpr size_t kMaxPatternLength = 1024;
  static constexpr size_t kMaxStates = 20000;
  static constexpr int kMaxNesting = 32;

  // Throws InputError("<what>: ...") when the pattern is invalid, unsupported or too large.
  PatternMatcher(const std::string& pattern, const std::string& what);

  // True when the whole of `text` matches.
  bool full_match(const std::string& text) const;

  struct State {
    enum Kind : uint8_t { kByteSet, kSplit, kMatch } kind = kMatch;
    std::vector<bool> bytes;  // kByteSet: the bytes it accepts (256 entries)
    int out = -1, out2 = -1;
  };

 private:
  std::vector<State> states_;
  int start_ = -1;
};

}  // namespace loratune
