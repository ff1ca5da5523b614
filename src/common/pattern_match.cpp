#include "common/pattern_match.h"

#include "loratune/errors.h"

namespace loratune {
namespace {

constexpr int kUnbounded = -1;
constexpr int kMaxRepeat = 100;

struct Node {
  enum Kind { kSet, kConcat, kAlt, kRepeat } kind = kConcat;
  std::vector<bool> bytes;  // kSet
  std::vector<Node> children;
  int min = 0, max = 0;  // kRepeat
};

std::vector<bool> byte_set() { return std::vector<bool>(256, false); }

void add_class(std::vector<bool>& set, char cls) {
  for (int c = 0; c < 256; ++c) {
    const bool digit = c >= '0' && c <= '9';
    const bool word = digit || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
    const bool space = c == ' ' || (c >= '\t' && c <= '\r');
    const bool in = cls == 'd' ? digit : cls == 'D' ? !digit : cls == 'w' ? word : cls == 'W' ? !word
                  : cls == 's' ? space : !space;
    if (in) set[static_cast<size_t>(c)] = true;
  }
}

// Recursive descent over the pattern; recursion depth is bounded by kMaxNesting groups.
class Parser {
 public:
  Parser(const std::string& p, const std::string& what) : p_(p), what_(what) {}

  Node parse() {
    if (p_.size() > PatternMatcher::kMaxPatternLength)
      fail("longer than " + std::to_string(PatternMatcher::kMaxPatternLength) + " characters");
    if (peek('^')) ++i_;
    Node n = alternation(0);
    if (i_ < p_.size()) fail(p_[i_] == ')' ? "unbalanced )" : "unexpected " + std::string(1, p_[i_]));
    return n;
  }

 private:
  [[noreturn]] void fail(const std::string& why) const {
    throw InputError(what_ + ": pattern \"" + p_.substr(0, 80) + (p_.size() > 80 ? "..." : "") + "\": " + why);
  }
  bool peek(char c) const { return i_ < p_.size() && p_[i_] == c; }

  Node alternation(int depth) {
    Node alt;
    alt.kind = Node::kAlt;
    alt.children.push_back(concatenation(depth));
    while (peek('|')) {
      ++i_;
      alt.children.push_back(concatenation(depth));
    }
    return alt.children.size() == 1 ? std::move(alt.children[0]) : alt;
  }

  Node concatenation(int depth) {
    Node cat;
    cat.kind = Node::kConcat;
    while (i_ < p_.size() && p_[i_] != '|' && p_[i_] != ')') {
      if (p_[i_] == '$' && i_ + 1 == p_.size()) {
        ++i_;
        break;
      }
      cat.children.push_back(repetition(depth));
    }
    return cat;
  }

  Node repetition(int depth) {
    Node atom_node = atom(depth);
    while (i_ < p_.size() && (p_[i_] == '*' || p_[i_] == '+' || p_[i_] == '?' || p_[i_] == '{')) {
      Node r;
      r.kind = Node::kRepeat;
      const char q = p_[i_++];
      if (q == '*') r.min = 0, r.max = kUnbounded;
      else if (q == '+') r.min = 1, r.max = kUnbounded;
      else if (q == '?') r.min = 0, r.max = 1;
      else braces(r);
      if (peek('?')) ++i_;  // lazy quantifiers match the same strings
      r.children.push_back(std::move(atom_node));
      atom_node = std::move(r);
    }
    return atom_node;
  }

  void braces(Node& r) {
    auto number = [&]() {
      if (i_ >= p_.size() || p_[i_] < '0' || p_[i_] > '9') fail("expected a number in {}");
      int v = 0;
      while (i_ < p_.size() && p_[i_] >= '0' && p_[i_] <= '9') {
        v = v * 10 + (p_[i_++] - '0');
        if (v > kMaxRepeat) fail("repeat counts above " + std::to_string(kMaxRepeat) + " are not supported");
      }
      return v;
    };
    r.min = number();
    r.max = r.min;
    if (peek(',')) {
      ++i_;
      r.max = peek('}') ? kUnbounded : number();
    }
    if (!peek('}')) fail("unclosed {");
    ++i_;
    if (r.max != kUnbounded && r.max < r.min) fail("{n,m} with m < n");
  }

  Node atom(int depth) {
    Node n;
    n.kind = Node::kSet;
    n.bytes = byte_set();
    const char c = p_[i_++];
    if (c == '(') {
      if (depth + 1 > PatternMatcher::kMaxNesting)
        fail("groups nested deeper than " + std::to_string(PatternMatcher::kMaxNesting));
      if (peek('?')) {
        if (i_ + 1 < p_.size() && p_[i_ + 1] == ':') i_ += 2;
        else fail("look-arounds and named groups are not supported");
      }
      Node inner = alternation(depth + 1);
      if (!peek(')')) fail("unclosed (");
      ++i_;
      return inner;
    }
    if (c == '[') return bracket();
    if (c == '.') {
      n.bytes.assign(256, true);
      n.bytes['\n'] = false;
      return n;
    }
    if (c == '\\') {
      if (i_ >= p_.size()) fail("ends with a lone backslash");
      const char e = p_[i_++];
      if (std::string("dDwWsS").find(e) != std::string::npos) add_class(n.bytes, e);
      else if (e >= '1' && e <= '9') fail("back-references are not supported");
      else n.bytes[static_cast<unsigned char>(e == 't' ? '\t' : e == 'n' ? '\n' : e)] = true;
      return n;
    }
    if (c == '*' || c == '+' || c == '?' || c == '{') fail(std::string("nothing to repeat before ") + c);
    if (c == '^') fail("^ is only allowed at the start");
    if (c == '$') fail("$ is only allowed at the end");
    n.bytes[static_cast<unsigned char>(c)] = true;
    return n;
  }

  Node bracket() {
    Node n;
    n.kind = Node::kSet;
    n.bytes = byte_set();
    const bool negate = peek('^');
    if (negate) ++i_;
    bool first = true;
    while (i_ < p_.size() && (p_[i_] != ']' || first)) {
      first = false;
      unsigned char lo = static_cast<unsigned char>(p_[i_++]);
      if (lo == '\\') {
        if (i_ >= p_.size()) break;
        const char e = p_[i_++];
        if (std::string("dDwWsS").find(e) != std::string::npos) {
          add_class(n.bytes, e);
          continue;
        }
        lo = static_cast<unsigned char>(e);
      }
      unsigned char hi = lo;
      if (i_ + 1 < p_.size() && p_[i_] == '-' && p_[i_ + 1] != ']') {
        hi = static_cast<unsigned char>(p_[i_ + 1]);
        i_ += 2;
        if (hi == '\\' && i_ < p_.size()) hi = static_cast<unsigned char>(p_[i_++]);
        if (hi < lo) fail("range out of order in [...]");
      }
      for (int b = lo; b <= hi; ++b) n.bytes[static_cast<size_t>(b)] = true;
    }
    if (!peek(']')) fail("unclosed [");
    ++i_;
    if (negate) n.bytes.flip();
    return n;
  }

  const std::string& p_;
  const std::string& what_;
  size_t i_ = 0;
};

// Thompson construction: each fragment has a start state and a list of dangling exits to patch.
struct Fragment {
  int start;
  std::vector<std::pair<int, int>> exits;  // (state, 0 = out / 1 = out2)
};

class Compiler {
 public:
  Compiler(std::vector<PatternMatcher::State>& states, const std::string& what) : states_(states), what_(what) {}

  Fragment compile(const Node& n) {
    switch (n.kind) {
      case Node::kSet: {
        const int s = add(PatternMatcher::State::kByteSet);
        states_[s].bytes = n.bytes;
        return {s, {{s, 0}}};
      }
      case Node::kConcat: {
        if (n.children.empty()) return empty();
        Fragment f = compile(n.children[0]);
        for (size_t k = 1; k < n.children.size(); ++k) {
          Fragment next = compile(n.children[k]);
          patch(f, next.start);
          f.exits = std::move(next.exits);
        }
        return f;
      }
      case Node::kAlt: {
        Fragment f = compile(n.children[0]);
        for (size_t k = 1; k < n.children.size(); ++k) {
          Fragment other = compile(n.children[k]);
          const int split = add(PatternMatcher::State::kSplit);
          states_[split].out = f.start;
          states_[split].out2 = other.start;
          f.start = split;
          f.exits.insert(f.exits.end(), other.exits.begin(), other.exits.end());
        }
        return f;
      }
      case Node::kRepeat: {
        const Node& child = n.children[0];
        Fragment f = empty();
        for (int k = 0; k < n.min; ++k) append(f, compile(child));
        if (n.max == kUnbounded) {
          Fragment body = compile(child);
          const int split = add(PatternMatcher::State::kSplit);
          states_[split].out = body.start;
          patch(body, split);
          append(f, {split, {{split, 1}}});
        } else {
          for (int k = n.min; k < n.max; ++k) {
            Fragment body = compile(child);
            const int split = add(PatternMatcher::State::kSplit);
            states_[split].out = body.start;
            body.exits.push_back({split, 1});
            append(f, {split, body.exits});
          }
        }
        return f;
      }
    }
    return empty();
  }

  void patch(const Fragment& f, int target) {
    for (const auto& [s, slot] : f.exits) (slot == 0 ? states_[s].out : states_[s].out2) = target;
  }

 private:
  int add(PatternMatcher::State::Kind kind) {
    if (states_.size() >= PatternMatcher::kMaxStates)
      throw InputError(what_ + ": pattern is too large (over " + std::to_string(PatternMatcher::kMaxStates) + " states)");
    states_.emplace_back();
    states_.back().kind = kind;
    return static_cast<int>(states_.size()) - 1;
  }
  Fragment empty() {
    const int s = add(PatternMatcher::State::kSplit);  // an epsilon step: both exits go to the same place
    return {s, {{s, 0}, {s, 1}}};
  }
  void append(Fragment& f, Fragment next) {
    patch(f, next.start);
    f.exits = std::move(next.exits);
  }

  std::vector<PatternMatcher::State>& states_;
  const std::string& what_;
};

}  // namespace

PatternMatcher::PatternMatcher(const std::string& pattern, const std::string& what) {
  const Node tree = Parser(pattern, what).parse();
  Compiler compiler(states_, what);
  Fragment f = compiler.compile(tree);
  states_.emplace_back();  // kMatch
  compiler.patch(f, static_cast<int>(states_.size()) - 1);
  start_ = f.start;
}

bool PatternMatcher::full_match(const std::string& text) const {
  const size_t n = states_.size();
  std::vector<int> current, next, stack;
  std::vector<size_t> seen(n, SIZE_MAX);
  // Adds `s` and everything reachable from it without reading a byte.
  auto add = [&](std::vector<int>& list, int s, size_t generation) {
    stack.push_back(s);
    while (!stack.empty()) {
      const int t = stack.back();
      stack.pop_back();
      if (t < 0 || seen[static_cast<size_t>(t)] == generation) continue;
      seen[static_cast<size_t>(t)] = generation;
      const State& st = states_[static_cast<size_t>(t)];
      if (st.kind == State::kSplit) {
        stack.push_back(st.out2);
        stack.push_back(st.out);
      } else {
        list.push_back(t);
      }
    }
  };
  add(current, start_, 0);
  for (size_t pos = 0; pos < text.size() && !current.empty(); ++pos) {
    next.clear();
    const auto byte = static_cast<unsigned char>(text[pos]);
    for (int s : current) {
      const State& st = states_[static_cast<size_t>(s)];
      if (st.kind == State::kByteSet && st.bytes[byte]) add(next, st.out, pos + 1);
    }
    std::swap(current, next);
  }
  for (int s : current)
    if (states_[static_cast<size_t>(s)].kind == State::kMatch) return true;
  return false;
}

}  // namespace loratune
