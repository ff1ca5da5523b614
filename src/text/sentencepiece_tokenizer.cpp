#include "loratune/sentencepiece_tokenizer.h"

#include <ATen/ATen.h>
#include <unicode/locid.h>
#include <unicode/normalizer2.h>
#include <unicode/unistr.h>

#include <algorithm>
#include <cstring>
#include <limits>

#include "loratune/errors.h"

namespace loratune {
namespace {

constexpr const char* kSpace = "\xe2\x96\x81";  // U+2581, SentencePiece's whitespace mark
constexpr float kUnknownPenalty = 10.0f;         // unknown characters score this much below the rarest piece

// A bounds-checked reader of protobuf wire format (the model file is untrusted input).
class Wire {
 public:
  Wire(const char* data, size_t size) : p_(data), end_(data + size) {}
  bool done() const { return p_ >= end_; }
  uint64_t varint() {
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      if (p_ >= end_) fail();
      const auto byte = static_cast<unsigned char>(*p_++);
      v |= static_cast<uint64_t>(byte & 0x7f) << shift;
      if (!(byte & 0x80)) return v;
    }
    fail();
  }
  Wire bytes() {
    const uint64_t n = varint();
    if (n > static_cast<uint64_t>(end_ - p_)) fail();
    Wire inner(p_, static_cast<size_t>(n));
    p_ += n;
    return inner;
  }
  std::string string() {
    Wire w = bytes();
    return std::string(w.p_, w.end_);
  }
  float fixed32() {
    if (end_ - p_ < 4) fail();
    uint32_t bits = 0;
    for (int i = 3; i >= 0; --i) bits = (bits << 8) | static_cast<unsigned char>(p_[i]);
    p_ += 4;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  }
  void skip(int wire_type) {
    switch (wire_type) {
      case 0: varint(); return;
      case 1: advance(8); return;
      case 2: bytes(); return;
      case 5: advance(4); return;
      default: fail();
    }
  }
  [[noreturn]] static void fail() { throw InputError("the SentencePiece model is damaged or not a SentencePiece model"); }

 private:
  void advance(size_t n) {
    if (static_cast<size_t>(end_ - p_) < n) fail();
    p_ += n;
  }
  const char* p_;
  const char* end_;
};

// Byte length of the UTF-8 character starting with `lead` (1 for stray continuation bytes).
size_t char_length(unsigned char lead) {
  if (lead >= 0xf0) return 4;
  if (lead >= 0xe0) return 3;
  if (lead >= 0xc0) return 2;
  return 1;
}

bool is_ascii_punctuation(char c) { return std::strchr("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~", c) != nullptr && c != 0; }

// The fields of a ModelProto that the tokenizer reads.
struct ParsedModel {
  struct Entry {
    std::string text;  // empty: a piece that never matches text (control, unknown, unused)
    int64_t id;
    float score;
  };
  std::vector<Entry> pieces;
  int64_t model_type = 1, unk = 0, eos = 2, pad = -1;
  float min_score = std::numeric_limits<float>::max();  // over the normal pieces
  std::string normalizer = "nmt_nfkc";
  bool dummy_prefix = true, collapse_whitespace = true;
};

// ModelProto.pieces: one SentencePiece (text, score, type).
void read_piece(Wire p, ParsedModel& m) {
  std::string text;
  float score = 0;
  uint64_t kind = 1;
  while (!p.done()) {
    const uint64_t t = p.varint();
    if ((t >> 3) == 1 && (t & 7) == 2) text = p.string();
    else if ((t >> 3) == 2 && (t & 7) == 5) score = p.fixed32();
    else if ((t >> 3) == 3 && (t & 7) == 0) kind = p.varint();
    else p.skip(static_cast<int>(t & 7));
  }
  const auto id = static_cast<int64_t>(m.pieces.size());
  if (kind == 2) m.unk = id;
  // Normal and user-defined pieces take part in segmentation; control and unused ones never match text.
  const bool matches = (kind == 1 || kind == 4) && !text.empty();
  if (matches && kind == 1) m.min_score = std::min(m.min_score, score);
  m.pieces.push_back({matches ? text : "", id, score});
}

// TrainerSpec: the model type and the special token ids.
void read_trainer_spec(Wire t, ParsedModel& m) {
  while (!t.done()) {
    const uint64_t tt = t.varint();
    const auto f = tt >> 3;
    if ((tt & 7) != 0) {
      t.skip(static_cast<int>(tt & 7));
      continue;
    }
    const auto v = static_cast<int64_t>(static_cast<int32_t>(t.varint()));
    if (f == 3) m.model_type = v;
    else if (f == 40) m.unk = v;
    else if (f == 42) m.eos = v;
    else if (f == 43) m.pad = v;
  }
}

// NormalizerSpec: its name and the whitespace rules.
void read_normalizer_spec(Wire n, ParsedModel& m) {
  while (!n.done()) {
    const uint64_t tt = n.varint();
    const auto f = tt >> 3;
    if (f == 1 && (tt & 7) == 2) m.normalizer = n.string();
    else if (f == 3 && (tt & 7) == 0) m.dummy_prefix = n.varint() != 0;
    else if (f == 4 && (tt & 7) == 0) m.collapse_whitespace = n.varint() != 0;
    else n.skip(static_cast<int>(tt & 7));
  }
}

ParsedModel parse_model(const std::string& bytes) {
  ParsedModel m;
  Wire w(bytes.data(), bytes.size());
  while (!w.done()) {
    const uint64_t tag = w.varint();
    const auto field = tag >> 3;
    const int type = static_cast<int>(tag & 7);
    if (field == 1 && type == 2) read_piece(w.bytes(), m);
    else if (field == 2 && type == 2) read_trainer_spec(w.bytes(), m);
    else if (field == 3 && type == 2) read_normalizer_spec(w.bytes(), m);
    else w.skip(type);
  }
  return m;
}

}  // namespace

SentencePieceTokenizer::SentencePieceTokenizer(const std::string& model, SentencePieceOptions options)
    : options_(options) {
  const ParsedModel parsed = parse_model(model);
  const auto& listed = parsed.pieces;
  const int64_t unk = parsed.unk, eos = parsed.eos, pad = parsed.pad;
  const int64_t model_type = parsed.model_type;
  if (listed.empty()) throw InputError("the SentencePiece model holds no pieces");
  if (model_type != 1)
    throw InputError("the SentencePiece model is not a unigram model (type " + std::to_string(model_type) + ")");
  const auto count = static_cast<int64_t>(listed.size());
  if (unk < 0 || unk >= count || eos < 0 || eos >= count || pad >= count)
    throw InputError("the SentencePiece model's special token ids lie outside its " + std::to_string(count) + " pieces");
  if (listed.size() > kMaxPieces)
    throw InputError("the SentencePiece model holds " + std::to_string(listed.size()) + " pieces (limit " +
                     std::to_string(kMaxPieces) + ")");
  piece_of_.push_back({-1, 0});
  for (const auto& [text, id, score] : listed) {
    if (text.empty()) continue;
    if (text.size() > kMaxPieceBytes)
      throw InputError("the SentencePiece model has a piece of " + std::to_string(text.size()) + " bytes (limit " +
                       std::to_string(kMaxPieceBytes) + ")");
    uint32_t node = 0;
    for (unsigned char byte : text) {
      auto [it, added] = edges_.emplace(uint64_t{node} << 8 | byte, static_cast<uint32_t>(piece_of_.size()));
      if (added) piece_of_.push_back({-1, 0});
      node = it->second;
    }
    if (piece_of_[node].id < 0) piece_of_[node] = {id, score};  // the first of duplicate pieces wins
  }
  nfkc_ = parsed.normalizer.find("nfkc") != std::string::npos;
  dummy_prefix_ = parsed.dummy_prefix;
  collapse_whitespace_ = parsed.collapse_whitespace;
  const float min_score = parsed.min_score;
  unknown_score_ = (min_score == std::numeric_limits<float>::max() ? 0.0f : min_score) - kUnknownPenalty;
  unk_ = unk, eos_ = eos, vocab_size_ = count;
  pad_ = options.pad_with_end || pad < 0 ? eos : pad;
}

std::string SentencePieceTokenizer::normalize(const std::string& text) const {
  icu::UnicodeString u = icu::UnicodeString::fromUTF8(text);
  if (nfkc_) {
    UErrorCode status = U_ZERO_ERROR;
    const icu::Normalizer2* nfkc = icu::Normalizer2::getNFKCInstance(status);
    if (U_SUCCESS(status)) {
      icu::UnicodeString normalized = nfkc->normalize(u, status);
      if (U_SUCCESS(status)) u = normalized;
    }
  }
  if (options_.lowercase) u.toLower(icu::Locale::getRoot());
  std::string s;
  u.toUTF8String(s);
  std::string cleaned;
  for (char c : s) {
    if (options_.strip_punctuation && is_ascii_punctuation(c)) continue;
    cleaned += (c == '\t' || c == '\n' || c == '\r') ? ' ' : c;
  }
  std::string out;
  bool space = true;  // drops leading spaces
  for (char c : cleaned) {
    if (c == ' ' && collapse_whitespace_) {
      if (!space) out += ' ';
      space = true;
    } else {
      out += c;
      space = false;
    }
  }
  if (collapse_whitespace_ && !out.empty() && out.back() == ' ') out.pop_back();
  if (out.empty()) return out;
  std::string escaped = dummy_prefix_ ? kSpace : "";
  for (char c : out) escaped += c == ' ' ? std::string(kSpace) : std::string(1, c);
  return escaped;
}

uint32_t SentencePieceTokenizer::child(uint32_t node, unsigned char byte) const {
  auto it = edges_.find(uint64_t{node} << 8 | byte);
  return it == edges_.end() ? 0 : it->second;
}

std::vector<int64_t> SentencePieceTokenizer::encode(const std::string& text) const {
  std::string s = normalize(text.substr(0, 4 * kMaxTextBytes));
  if (s.size() > kMaxTextBytes) {  // cut at a character boundary
    size_t cut = kMaxTextBytes;
    while (cut > 0 && (static_cast<unsigned char>(s[cut]) & 0xC0) == 0x80) --cut;
    s.resize(cut);
  }
  const size_t n = s.size();
  // best[i]: the highest total score of a segmentation of s[0:i]; back[i]: its last piece (start, id).
  std::vector<double> best(n + 1, -std::numeric_limits<double>::infinity());
  std::vector<std::pair<size_t, int64_t>> back(n + 1, {0, -1});
  best[0] = 0;
  for (size_t i = 0; i < n; i += char_length(static_cast<unsigned char>(s[i]))) {
    if (best[i] == -std::numeric_limits<double>::infinity()) continue;
    const size_t first = std::min(n - i, char_length(static_cast<unsigned char>(s[i])));
    bool single = false;
    // Walk the trie along s[i:]; a piece counts where it ends on a character boundary.
    uint32_t node = 0;
    size_t boundary = i + first;
    for (size_t j = i; j < n; ++j) {
      node = child(node, static_cast<unsigned char>(s[j]));
      if (node == 0) break;
      if (j + 1 < boundary) continue;
      const size_t len = j + 1 - i;
      if (const Piece& piece = piece_of_[node]; piece.id >= 0) {
        single |= len == first;
        const double score = best[i] + piece.score;
        if (score > best[i + len]) best[i + len] = score, back[i + len] = {i, piece.id};
      }
      if (j + 1 < n) boundary = std::min(n, j + 1 + char_length(static_cast<unsigned char>(s[j + 1])));
    }
    if (!single && best[i] + unknown_score_ > best[i + first])
      best[i + first] = best[i] + unknown_score_, back[i + first] = {i, unk_};
  }
  std::vector<int64_t> ids;
  for (size_t i = n; i > 0; i = back[i].first) ids.push_back(back[i].second);
  std::reverse(ids.begin(), ids.end());
  // Runs of unknown characters are one unknown token, as SentencePiece gives them.
  ids.erase(std::unique(ids.begin(), ids.end(), [&](int64_t a, int64_t b) { return a == unk_ && b == unk_; }), ids.end());
  return ids;
}

at::Tensor SentencePieceTokenizer::tokenize(const std::vector<std::string>& texts, int64_t context) const {
  if (context < 1) throw InputError("text context length must be positive");
  at::Tensor out = at::full({static_cast<int64_t>(texts.size()), context}, pad_, at::kLong);
  auto rows = out.accessor<int64_t, 2>();
  for (size_t r = 0; r < texts.size(); ++r) {
    std::vector<int64_t> ids = encode(texts[r]);
    if (static_cast<int64_t>(ids.size()) >= context) ids.resize(static_cast<size_t>(context - 1));
    ids.push_back(eos_);
    for (size_t c = 0; c < ids.size(); ++c) rows[static_cast<int64_t>(r)][static_cast<int64_t>(c)] = ids[c];
  }
  return out;
}

}  // namespace loratune
