// SentencePiece unigram tokenizer (SigLIP's text side), reading the `spiece.model` file that text-encoder bundles
// carry: NFKC normalisation (ICU), whitespace as U+2581 with a leading one, then the most probable segmentation
// under the pieces' scores (Viterbi over a byte trie of the pieces); characters no piece covers become the unknown
// token. Work is bounded whatever the file holds: pieces of at most kMaxPieceBytes, at most kMaxPieces of them, and
// the first kMaxTextBytes of a normalised text are segmented (far more than any context length needs).
#pragma once

#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

#include "loratune/text_tokenizer.h"

namespace loratune {

struct SentencePieceOptions {
  bool lowercase = false;          // SigLIP's tokenizer lowercases
  bool strip_punctuation = false;  // ... and drops ASCII punctuation before encoding
  bool pad_with_end = false;       // pad with the end-of-sentence token (SigLIP), not the model's pad token
};

class SentencePieceTokenizer : public TextTokenizer {
 public:
  static constexpr size_t kMaxPieceBytes = 1024, kMaxPieces = 1'000'000, kMaxTextBytes = 64 * 1024;

  // `model`: the bytes of a SentencePiece model file (a protobuf ModelProto). InputError when it is not one, or
  // not a unigram model.
  explicit SentencePieceTokenizer(const std::string& model, SentencePieceOptions options = {});

  // Piece ids of `text`, without the end-of-sentence token.
  std::vector<int64_t> encode(const std::string& text) const;
  // [N, context]: pieces, end-of-sentence, padding; too long: truncated with end-of-sentence kept last.
  at::Tensor tokenize(const std::vector<std::string>& texts, int64_t context) const override;
  int64_t end_token() const override { return eos_; }
  int64_t pad_token() const { return pad_; }
  int64_t vocab_size() const { return vocab_size_; }  // the model's pieces: every id is below it
  // The normalised text that is segmented (exposed for tests).
  std::string normalize(const std::string& text) const;

 private:
  struct Piece {
    int64_t id;
    float score;
  };
  // The trie of the pieces' bytes: edges_[node << 8 | byte] is the child; piece_of_[node] the piece ending there.
  uint32_t child(uint32_t node, unsigned char byte) const;
  std::unordered_map<uint64_t, uint32_t> edges_;
  std::vector<Piece> piece_of_;  // id -1: no piece ends at that node
  float unknown_score_ = 0;
  int64_t unk_ = 0, eos_ = 1, pad_ = 0, vocab_size_ = 0;
  bool nfkc_ = true, dummy_prefix_ = true, collapse_whitespace_ = true;
  SentencePieceOptions options_;
};

}  // namespace loratune
