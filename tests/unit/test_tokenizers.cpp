// The text side's tokenizers against their references (hand-computed ids, Python's CLIP tokenizer, SentencePiece
// itself), and as untrusted input: damaged or hostile model files and prompts are InputErrors or bounded work.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <map>
#include <random>
#include <set>

#include "common/files.h"
#include "loratune/clip_tokenizer.h"
#include "loratune/errors.h"
#include "loratune/sentencepiece_tokenizer.h"
#include "test_support.h"

namespace loratune {
namespace {

using nlohmann::json;
using test::fixture;

ClipTokenizer small_tokenizer() { return ClipTokenizer(read_file(fixture("models/merges_small.txt"))); }

TEST(ClipTokenizer, HandComputedIds) {
  const ClipTokenizer tok = small_tokenizer();
  // Vocabulary: 256 byte symbols, the same with </w> (+256), then the 8 merges from 512, then start/end of text.
  EXPECT_EQ(tok.start_token(), 520);
  EXPECT_EQ(tok.end_token(), 521);
  // "a" is byte 97, the 65th printable byte (97 - 33 = 64), alone in its word: "a</w>" = 256 + 64 = 320.
  // "red": r e -> re (merge 0), re d</w> -> red</w> (merge 1) = 513. "photo": ph, pho, to</w>, photo</w> = 517.
  EXPECT_EQ(tok.encode("a red photo"), (std::vector<int64_t>{320, 513, 517}));
  // Lower-cased; "!!" is one punctuation piece: "!" (byte 33 -> 0) and "!</w>" (256).
  EXPECT_EQ(tok.encode("Red!!"), (std::vector<int64_t>{513, 0, 256}));
  // 고양이 = EA B3 A0 EC 96 91 EC 9D B4. EA, B3 are printable Latin-1 (166, 111) and merge (merge 7) into 519;
  // A0 is not printable: the 67th such byte -> 188 + 66 = 254; EC -> 168; 96 -> 244; 91 -> 239; 9D -> 251;
  // the last byte B4 (112) ends the word: 112 + 256 = 368.
  EXPECT_EQ(tok.encode("고양이"), (std::vector<int64_t>{519, 254, 168, 244, 239, 168, 251, 368}));
  // Truncation keeps the end token last.
  std::string long_text;
  for (int i = 0; i < 100; ++i) long_text += "a ";
  const at::Tensor t = tok.tokenize({long_text, ""}, 77);
  EXPECT_EQ(t.sizes(), (at::IntArrayRef{2, 77}));
  EXPECT_EQ(t[0][0].item<int64_t>(), 520);
  EXPECT_EQ(t[0][1].item<int64_t>(), 320);
  EXPECT_EQ(t[0][76].item<int64_t>(), 521);
  EXPECT_EQ(t[1][1].item<int64_t>(), 521);
  EXPECT_EQ(t[1][2].item<int64_t>(), 0) << "zero padding";
}

TEST(ClipTokenizer, MatchesPythonReference) {
  const ClipTokenizer tok = small_tokenizer();
  const json ref = json::parse(read_file(fixture("models/tokens_ref.json")));
  std::vector<std::string> texts;
  for (const auto& c : ref["cases"]) {
    texts.push_back(c["text"]);
    EXPECT_EQ(tok.encode(c["text"]), c["ids"].get<std::vector<int64_t>>()) << c["text"];
  }
  texts.push_back(ref["long_text"]);
  const at::Tensor rows = tok.tokenize(texts, 77);
  const auto expected = ref["tokenized"].get<std::vector<std::vector<int64_t>>>();
  for (size_t r = 0; r < expected.size(); ++r)
    for (size_t k = 0; k < 77; ++k) ASSERT_EQ(rows[r][k].item<int64_t>(), expected[r][k]) << r << "," << k;
}

TEST(SentencePieceTokenizer, MatchesSentencePieceItself) {
  const SentencePieceTokenizer tok(read_file(fixture("models/spiece_small.model")));
  const json ref = json::parse(read_file(fixture("models/spiece_ref.json")));
  ASSERT_GE(ref.size(), 8u);
  for (const auto& c : ref) EXPECT_EQ(tok.encode(c["text"]), c["ids"].get<std::vector<int64_t>>()) << c["text"];
  // Rows: pieces, end-of-sentence (id 1), then the model's pad id (0), or the end token where SigLIP pads with it;
  // too long: end-of-sentence kept last.
  const std::vector<int64_t> cat = ref[0]["ids"].get<std::vector<int64_t>>();
  const at::Tensor rows = tok.tokenize({ref[0]["text"], ref[0]["text"]}, static_cast<int64_t>(cat.size()) + 3);
  for (size_t k = 0; k < cat.size(); ++k) EXPECT_EQ(rows[0][static_cast<int64_t>(k)].item<int64_t>(), cat[k]);
  EXPECT_EQ(rows[0][static_cast<int64_t>(cat.size())].item<int64_t>(), 1);
  EXPECT_EQ(rows[1][-1].item<int64_t>(), 0);
  const at::Tensor short_rows = tok.tokenize({ref[0]["text"]}, 3);
  EXPECT_EQ(short_rows[0][0].item<int64_t>(), cat[0]);
  EXPECT_EQ(short_rows[0][2].item<int64_t>(), 1);
  SentencePieceOptions siglip;
  siglip.lowercase = siglip.strip_punctuation = siglip.pad_with_end = true;
  const SentencePieceTokenizer lowered(read_file(fixture("models/spiece_small.model")), siglip);
  EXPECT_EQ(lowered.encode("A Photo, of a CAT."), tok.encode("a photo of a cat")) << "lower case, no punctuation";
  EXPECT_EQ(lowered.tokenize({"cat"}, 8)[0][-1].item<int64_t>(), 1) << "padded with the end token";
}

TEST(SentencePieceTokenizer, RejectsDamagedModels) {
  const std::string model = read_file(fixture("models/spiece_small.model"));
  EXPECT_THROW_WITH(SentencePieceTokenizer(""), InputError, "holds no pieces");
  EXPECT_THROW_WITH(SentencePieceTokenizer(model.substr(0, model.size() / 2)), InputError, "damaged");
  EXPECT_THROW_WITH(SentencePieceTokenizer(std::string("\x0a\xff\xff\xff\xff\x0f", 6)), InputError, "damaged");
  for (size_t cut = 1; cut < model.size(); cut += model.size() / 97) {  // every truncation: an error, never a crash
    try {
      SentencePieceTokenizer t(model.substr(0, cut));
    } catch (const InputError&) {
    }
  }
}

// A SentencePiece ModelProto of unigram pieces (normal pieces, then <unk> as id `pieces.size()`), no normaliser and
// no dummy prefix, so that a test controls exactly what is segmented.
std::string sentencepiece_model(const std::vector<std::pair<std::string, float>>& pieces) {
  auto varint = [](uint64_t v) {
    std::string out;
    for (; v >= 0x80; v >>= 7) out += static_cast<char>((v & 0x7F) | 0x80);
    return out + static_cast<char>(v);
  };
  auto field_bytes = [&](int field, const std::string& bytes) { return varint(uint64_t(field) << 3 | 2) + varint(bytes.size()) + bytes; };
  auto field_int = [&](int field, uint64_t v) { return varint(uint64_t(field) << 3) + varint(v); };
  std::string model;
  auto piece = [&](const std::string& text, float score, int kind) {
    std::string p = field_bytes(1, text) + varint(2 << 3 | 5);
    p.append(reinterpret_cast<const char*>(&score), 4);
    return field_bytes(1, p + field_int(3, static_cast<uint64_t>(kind)));
  };
  for (const auto& [text, score] : pieces) model += piece(text, score, 1);
  model += piece("<unk>", 0, 2);
  const auto unk = pieces.size();
  model += field_bytes(2, field_int(3, 1) + field_int(40, unk) + field_int(42, unk) + field_int(43, unk));
  model += field_bytes(3, field_bytes(1, "identity") + field_int(3, 0) + field_int(4, 0));
  return model;
}

// The segmentation as the tokenizer first computed it: every substring length at character boundaries looked up
// (quadratic in the piece length; the reference for the trie walk).
std::vector<int64_t> reference_segmentation(const std::vector<std::pair<std::string, float>>& pieces, const std::string& s) {
  std::map<std::string, std::pair<int64_t, float>> table;
  float lowest = 0;
  for (size_t k = 0; k < pieces.size(); ++k) {
    table.emplace(pieces[k].first, std::pair<int64_t, float>{static_cast<int64_t>(k), pieces[k].second});
    lowest = std::min(lowest, pieces[k].second);
  }
  const int64_t unk = static_cast<int64_t>(pieces.size());
  const size_t n = s.size();
  std::vector<double> best(n + 1, -1e300);
  std::vector<std::pair<size_t, int64_t>> back(n + 1, {0, -1});
  best[0] = 0;
  for (size_t i = 0; i < n; ++i) {  // ASCII: every byte is a character
    bool single = false;
    for (size_t len = 1; i + len <= n; ++len) {
      auto it = table.find(s.substr(i, len));
      if (it == table.end()) continue;
      single |= len == 1;
      if (best[i] + it->second.second > best[i + len]) best[i + len] = best[i] + it->second.second, back[i + len] = {i, it->second.first};
    }
    if (!single && best[i] + lowest - 10.0 > best[i + 1]) best[i + 1] = best[i] + lowest - 10.0, back[i + 1] = {i, unk};
  }
  std::vector<int64_t> ids;
  for (size_t i = n; i > 0; i = back[i].first) ids.push_back(back[i].second);
  std::reverse(ids.begin(), ids.end());
  ids.erase(std::unique(ids.begin(), ids.end(), [&](int64_t a, int64_t b) { return a == unk && b == unk; }), ids.end());
  return ids;
}

TEST(SentencePieceTokenizer, TrieSegmentationEqualsTheExhaustiveOne) {
  std::mt19937 rng(7);
  for (int round = 0; round < 40; ++round) {
    std::vector<std::pair<std::string, float>> pieces;
    std::set<std::string> seen;
    const int count = 3 + static_cast<int>(rng() % 30);
    while (static_cast<int>(pieces.size()) < count) {
      std::string text(1 + rng() % 5, 'a');
      for (char& c : text) c = static_cast<char>('a' + rng() % 4);
      if (seen.insert(text).second) pieces.push_back({text, -static_cast<float>(rng() % 1000) / 100.0f});
    }
    const SentencePieceTokenizer tok(sentencepiece_model(pieces));
    for (int k = 0; k < 10; ++k) {
      std::string text(rng() % 40, 'a');
      for (char& c : text) c = static_cast<char>('a' + rng() % 5);  // 'e': no piece, the unknown token
      ASSERT_EQ(tok.encode(text), reference_segmentation(pieces, text)) << text;
    }
  }
}

TEST(SentencePieceTokenizer, WorkIsBoundedWhateverTheModelHolds) {
  EXPECT_THROW_WITH(SentencePieceTokenizer(sentencepiece_model({{std::string(2000, 'a'), -1.0f}})), InputError,
                    "a piece of 2000 bytes (limit 1024)");
  // 1,000 pieces sharing prefixes (a, aa, ..., a x 1000) and a text of 200,000 a's: the trie walk stops at the
  // longest piece, and the text is segmented up to kMaxTextBytes. The best segmentation is the fewest pieces.
  std::vector<std::pair<std::string, float>> chain;
  for (size_t len = 1; len <= 1000; ++len) chain.push_back({std::string(len, 'a'), -1.0f});
  const SentencePieceTokenizer tok(sentencepiece_model(chain));
  const std::vector<int64_t> ids = tok.encode(std::string(200000, 'a'));
  const size_t n = SentencePieceTokenizer::kMaxTextBytes;
  ASSERT_EQ(ids.size(), (n + 999) / 1000);
  size_t covered = 0;
  for (int64_t id : ids) covered += static_cast<size_t>(id) + 1;  // piece k is k + 1 a's
  EXPECT_EQ(covered, n);
  // Invalid UTF-8 in a prompt is text like any other (replacement characters), never a crash.
  EXPECT_EQ(tok.tokenize({std::string("\xff\xfe a \xc3", 6)}, 8).size(1), 8);
}

TEST(ClipTokenizer, LongWordsAndTextsAreBounded) {
  const ClipTokenizer tok = small_tokenizer();
  // A 300,000-letter word and a 300,000-word text: only what fills the context is encoded.
  const at::Tensor rows = tok.tokenize({std::string(300000, 'a'), [] {
                                          std::string t;
                                          for (int k = 0; k < 300000; ++k) t += "red ";
                                          return t;
                                        }()},
                                       77);
  EXPECT_EQ(rows.size(1), 77);
  EXPECT_EQ(rows[0][76].item<int64_t>(), rows[1][76].item<int64_t>()) << "both truncated, end token last";
  EXPECT_EQ(tok.encode("red photo", 1), tok.encode("red"));
  EXPECT_FALSE(tok.encode(std::string("\xff\xfe a \xc3", 6)).empty());
}

TEST(ClipTokenizer, RejectsDamagedMergesFiles) {
  EXPECT_THROW_WITH(ClipTokenizer("#version: 0.2\n"), InputError, "holds no merges");
  EXPECT_THROW_WITH(ClipTokenizer("#version: 0.2\na b c\n"), InputError, "line 2: expected two symbols");
}


// Prompts a user or a class folder name may hold: Korean, emoji, invalid UTF-8, control characters, long runs.
std::vector<std::string> hostile_prompts() {
  return {"a photo of a cat", "고양이 사진", "\xF0\x9F\x90\x88 \xE2\x80\x8B", std::string("\xff\xfe\xc3 \x80\xed\xa0\x80", 8),
          std::string("a\0b\x1b[2J", 7), std::string(5000, 'x'), std::string(3000, ' ') + "z", ""};
}

// Every mutation of a tokenizer file is an InputError or a tokenizer whose rows, for every hostile prompt, have the
// context's length and ids inside its vocabulary. Bounded in count and time.
template <typename Tokenizer>
void fuzz_tokenizer(const std::string& original, int iterations, double seconds) {
  std::mt19937_64 rng(2024);
  const auto start = std::chrono::steady_clock::now();
  int loaded = 0, i = 0;
  for (; i < iterations; ++i) {
    if (std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() > seconds) break;
    const std::string bytes = test::mutate(original, rng);
    try {
      const Tokenizer tok(bytes);
      ++loaded;
      const at::Tensor rows = tok.tokenize(hostile_prompts(), 77);
      ASSERT_EQ(rows.sizes(), (at::IntArrayRef{static_cast<int64_t>(hostile_prompts().size()), 77})) << "mutation " << i;
      ASSERT_GE(rows.min().item<int64_t>(), 0) << "mutation " << i;
      ASSERT_LT(rows.max().item<int64_t>(), tok.vocab_size()) << "mutation " << i;
    } catch (const InputError&) {
    } catch (const std::exception& e) {
      FAIL() << "mutation " << i << " escaped as " << typeid(e).name() << ": " << e.what();
    }
  }
  std::printf("fuzz tokenizer: %d mutations, %d still loaded\n", i, loaded);
  EXPECT_GT(i, 100);
  EXPECT_GT(loaded, 0) << "no mutation kept a working tokenizer: the loop tests only the parser's first check";
}

TEST(Fuzz, ClipMergesFileMutationsAreInputErrorsOrWorkingTokenizers) {
  fuzz_tokenizer<ClipTokenizer>(read_file(fixture("models/merges_small.txt")), 3000, 15.0);
}

TEST(Fuzz, SentencePieceModelMutationsAreInputErrorsOrWorkingTokenizers) {
  fuzz_tokenizer<SentencePieceTokenizer>(read_file(fixture("models/spiece_small.model")), 3000, 15.0);
}

}  // namespace
}  // namespace loratune
