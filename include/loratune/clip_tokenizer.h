// CLIP's byte-level BPE tokenizer (as open_clip / ml-mobileclip), reading the merges file that text-encoder bundles
// carry. Text is HTML-unescaped, whitespace-collapsed and lowercased (no ftfy repair), split with CLIP's pattern
// using Unicode letter and number classes (ICU), then byte-pair encoded.
#pragma once

#include <ATen/Tensor.h>

#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "loratune/text_tokenizer.h"

namespace loratune {

class ClipTokenizer : public TextTokenizer {
 public:
  // `merges_text`: the merges file (first line a version header, then "a b" per line). CLIP uses the first 48,894
  // merges of bpe_simple_vocab_16e6.txt.
  explicit ClipTokenizer(const std::string& merges_text, size_t max_merges = 48894);

  // Work is bounded whatever the text: a word of more than kMaxWordBytes bytes (a run of letters, say) is encoded
  // in parts of at most that many bytes (CLIP's reference would merge across them; no real word is that long).
  static constexpr size_t kMaxWordBytes = 256;

  // BPE token ids of `text`, without start/end tokens; at most `max_tokens` of them (the rest is not encoded).
  std::vector<int64_t> encode(const std::string& text, size_t max_tokens = SIZE_MAX) const;
  // [N, context] int64: <start_of_text>, tokens, <end_of_text>, zero padding; too long: truncated with <end_of_text>
  // kept as the last token.
  at::Tensor tokenize(const std::vector<std::string>& texts, int64_t context = 77) const override;

  int64_t start_token() const { return sot_; }
  int64_t end_token() const override { return eot_; }
  int64_t vocab_size() const { return eot_ + 1; }

  // Text cleaning and splitting, exposed for tests.
  static std::string clean(const std::string& text);
  static std::vector<std::string> pre_tokenize(const std::string& cleaned);

 private:
  // `end_of_word`: the token is the end of its word (its last symbol carries </w>).
  std::vector<std::string> bpe(const std::string& token, bool end_of_word) const;

  std::string byte_encoder_[256];
  std::unordered_map<std::string, int64_t> encoder_;
  std::unordered_map<std::string, size_t> ranks_;  // "a b" -> rank
  int64_t sot_ = 0, eot_ = 0;
};

}  // namespace loratune
