#include "loratune/clip_tokenizer.h"

#include <ATen/ATen.h>
#include <unicode/locid.h>
#include <unicode/uchar.h>
#include <unicode/unistr.h>
#include <unicode/utf8.h>

#include <algorithm>
#include <climits>
#include <sstream>

#include "loratune/errors.h"

namespace loratune {
namespace {

std::string utf8_of(UChar32 c) {
  std::string out;
  icu::UnicodeString(c).toUTF8String(out);
  return out;
}

bool is_space(UChar32 c) { return u_isUWhiteSpace(c) || (c >= 0x1c && c <= 0x1f); }
bool is_letter(UChar32 c) { return (U_GET_GC_MASK(c) & U_GC_L_MASK) != 0; }
bool is_number(UChar32 c) { return (U_GET_GC_MASK(c) & U_GC_N_MASK) != 0; }

std::vector<UChar32> code_points(const std::string& s) {
  std::vector<UChar32> out;
  const auto* p = reinterpret_cast<const uint8_t*>(s.data());
  const auto n = static_cast<int32_t>(s.size());
  for (int32_t i = 0; i < n;) {
    UChar32 c;
    U8_NEXT(p, i, n, c);
    out.push_back(c < 0 ? 0xfffd : c);
  }
  return out;
}

std::string from_code_points(const std::vector<UChar32>& cps, size_t begin, size_t end) {
  std::string out;
  for (size_t i = begin; i < end; ++i) out += utf8_of(cps[i]);
  return out;
}

// Numeric and common named character references, as html.unescape does for them.
std::string html_unescape(const std::string& s) {
  static const std::pair<const char*, const char*> kNamed[] = {
      {"amp", "&"}, {"lt", "<"}, {"gt", ">"}, {"quot", "\""}, {"apos", "'"}, {"nbsp", "\xc2\xa0"}};
  std::string out;
  for (size_t i = 0; i < s.size();) {
    if (s[i] == '&') {
      const size_t semi = s.find(';', i);
      if (semi != std::string::npos && semi - i <= 10) {
        const std::string name = s.substr(i + 1, semi - i - 1);
        std::string replacement;
        if (!name.empty() && name[0] == '#') {
          try {
            const bool hex = name.size() > 1 && (name[1] == 'x' || name[1] == 'X');
            const long cp = std::stol(name.substr(hex ? 2 : 1), nullptr, hex ? 16 : 10);
            if (cp > 0 && cp <= 0x10ffff) replacement = utf8_of(static_cast<UChar32>(cp));
          } catch (const std::exception&) {
          }
        } else {
          for (const auto& [n, r] : kNamed)
            if (name == n) replacement = r;
        }
        if (!replacement.empty()) {
          out += replacement;
          i = semi + 1;
          continue;
        }
      }
    }
    out += s[i++];
  }
  return out;
}

}  // namespace

std::string ClipTokenizer::clean(const std::string& text) {
  const auto cps = code_points(html_unescape(html_unescape(text)));
  std::vector<UChar32> collapsed;
  for (UChar32 c : cps) {
    if (is_space(c)) {
      if (!collapsed.empty() && collapsed.back() != ' ') collapsed.push_back(' ');
    } else {
      collapsed.push_back(c);
    }
  }
  while (!collapsed.empty() && collapsed.back() == ' ') collapsed.pop_back();
  std::string joined = from_code_points(collapsed, 0, collapsed.size()), lowered;
  icu::UnicodeString::fromUTF8(joined).toLower(icu::Locale::getRoot()).toUTF8String(lowered);
  return lowered;
}

std::vector<std::string> ClipTokenizer::pre_tokenize(const std::string& cleaned) {
  static const char* kContractions[] = {"'s", "'t", "'re", "'ve", "'m", "'ll", "'d"};
  const auto cps = code_points(cleaned);
  std::vector<std::string> out;
  for (size_t i = 0; i < cps.size();) {
    const UChar32 c = cps[i];
    if (is_space(c)) {
      ++i;
      continue;
    }
    if (c == '\'') {
      bool matched = false;
      for (const char* contraction : kContractions) {
        const size_t len = std::char_traits<char>::length(contraction);
        if (i + len <= cps.size() && from_code_points(cps, i, i + len) == contraction) {
          out.push_back(contraction);
          i += len;
          matched = true;
          break;
        }
      }
      if (matched) continue;
    }
    size_t j = i + 1;
    if (is_letter(c)) {
      while (j < cps.size() && is_letter(cps[j])) ++j;
    } else if (!is_number(c)) {
      while (j < cps.size() && !is_space(cps[j]) && !is_letter(cps[j]) && !is_number(cps[j])) ++j;
    }
    out.push_back(from_code_points(cps, i, j));
    i = j;
  }
  return out;
}

ClipTokenizer::ClipTokenizer(const std::string& merges_text, size_t max_merges) {
  // Bytes to printable characters: printable Latin-1 bytes map to themselves, the others to U+0100 onwards.
  std::vector<int> order;
  for (int b = '!'; b <= '~'; ++b) order.push_back(b);
  for (int b = 0xa1; b <= 0xac; ++b) order.push_back(b);
  for (int b = 0xae; b <= 0xff; ++b) order.push_back(b);
  std::vector<UChar32> chars(order.begin(), order.end());
  int extra = 0;
  for (int b = 0; b < 256; ++b)
    if (std::find(order.begin(), order.end(), b) == order.end()) order.push_back(b), chars.push_back(256 + extra++);
  std::vector<std::string> vocab;
  for (size_t k = 0; k < order.size(); ++k) {
    byte_encoder_[order[k]] = utf8_of(chars[k]);
    vocab.push_back(byte_encoder_[order[k]]);
  }
  for (size_t k = 0; k < 256; ++k) vocab.push_back(vocab[k] + "</w>");

  std::istringstream lines(merges_text);
  std::string line;
  std::getline(lines, line);  // version header
  size_t count = 0;
  while (count < max_merges && std::getline(lines, line)) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    const size_t space = line.find(' ');
    if (line.empty()) continue;
    if (space == std::string::npos || line.find(' ', space + 1) != std::string::npos)
      throw InputError("BPE merges file, line " + std::to_string(count + 2) + ": expected two symbols, got \"" + line + "\"");
    ranks_.emplace(line, count++);
    vocab.push_back(line.substr(0, space) + line.substr(space + 1));
  }
  if (count == 0) throw InputError("the BPE merges file holds no merges");
  vocab.push_back("<start_of_text>");
  vocab.push_back("<end_of_text>");
  for (size_t k = 0; k < vocab.size(); ++k) encoder_.emplace(vocab[k], static_cast<int64_t>(k));
  sot_ = static_cast<int64_t>(vocab.size()) - 2;
  eot_ = static_cast<int64_t>(vocab.size()) - 1;
}

std::vector<std::string> ClipTokenizer::bpe(const std::string& token, bool end_of_word) const {
  std::vector<std::string> word;
  for (const UChar32 c : code_points(token)) word.push_back(utf8_of(c));
  if (word.empty()) return word;
  if (end_of_word) word.back() += "</w>";
  while (word.size() > 1) {
    size_t best_rank = SIZE_MAX, best = 0;
    for (size_t i = 0; i + 1 < word.size(); ++i) {
      auto it = ranks_.find(word[i] + " " + word[i + 1]);
      if (it != ranks_.end() && it->second < best_rank) best_rank = it->second, best = i;
    }
    if (best_rank == SIZE_MAX) break;
    const std::string first = word[best], second = word[best + 1];
    std::vector<std::string> merged;
    for (size_t i = 0; i < word.size();) {
      if (i + 1 < word.size() && word[i] == first && word[i + 1] == second) {
        merged.push_back(first + second);
        i += 2;
      } else {
        merged.push_back(word[i++]);
      }
    }
    word = std::move(merged);
  }
  return word;
}

std::vector<int64_t> ClipTokenizer::encode(const std::string& text, size_t max_tokens) const {
  std::vector<int64_t> ids;
  for (const auto& piece : pre_tokenize(clean(text))) {
    for (size_t begin = 0; begin < piece.size() && ids.size() < max_tokens;) {
      size_t end = std::min(piece.size(), begin + kMaxWordBytes);
      while (end < piece.size() && end > begin + 1 && (static_cast<unsigned char>(piece[end]) & 0xC0) == 0x80) --end;
      std::string mapped;
      for (size_t k = begin; k < end; ++k) mapped += byte_encoder_[static_cast<unsigned char>(piece[k])];
      for (const auto& symbol : bpe(mapped, end == piece.size())) ids.push_back(encoder_.at(symbol));
      begin = end;
    }
    if (ids.size() >= max_tokens) break;
  }
  if (ids.size() > max_tokens) ids.resize(max_tokens);
  return ids;
}

at::Tensor ClipTokenizer::tokenize(const std::vector<std::string>& texts, int64_t context) const {
  at::Tensor out = at::zeros({static_cast<int64_t>(texts.size()), context}, at::kLong);
  auto acc = out.accessor<int64_t, 2>();
  for (size_t row = 0; row < texts.size(); ++row) {
    std::vector<int64_t> ids{sot_};
    const auto body = encode(texts[row], static_cast<size_t>(std::max<int64_t>(context, 0)));
    ids.insert(ids.end(), body.begin(), body.end());
    ids.push_back(eot_);
    if (static_cast<int64_t>(ids.size()) > context) {
      ids.resize(static_cast<size_t>(context));
      ids.back() = eot_;
    }
    for (size_t k = 0; k < ids.size(); ++k) acc[static_cast<int64_t>(row)][static_cast<int64_t>(k)] = ids[k];
  }
  return out;
}

}  // namespace loratune
