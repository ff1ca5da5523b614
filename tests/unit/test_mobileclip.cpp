// MobileCLIP: the CLIP tokenizer, zero-shot heads, LoRA on fused q/v slices of MCi attention, the frozen-prefix cache.
#include <ATen/core/grad_mode.h>
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <map>
#include <random>
#include <set>

#include "loratune/adapter_binding.h"
#include "loratune/targets.h"
#include "loratune/clip_tokenizer.h"
#include "loratune/errors.h"
#include "common/files.h"
#include "loratune/loader.h"
#include "loratune/merge.h"
#include "loratune/safetensors.h"
#include "loratune/sentencepiece_tokenizer.h"
#include "loratune/train_step.h"
#include "loratune/trainer.h"
#include "loratune/training_setup.h"
#include "loratune/zero_shot.h"
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

TEST(MobileClip, DefaultTargetsAreQAndVSlicesOfTheLastStage) {
  Model m(load_bundle(fixture("models/mobileclip_trace.pt")));
  const auto t = resolve_targets(m.module(), LoraSettings{});
  ASSERT_EQ(t.size(), 4u);
  EXPECT_EQ(t[0].module, "image_encoder.model.network.7.0.token_mixer.qkv");
  EXPECT_EQ(t[0].slice, "q");
  EXPECT_EQ(t[1].slice, "v");
  EXPECT_EQ(t[1].row_begin, 96);
}

TEST(MobileClip, ZeroShotHeadPredictsTheAgreedClasses) {
  Model model(load_bundle(fixture("models/mobileclip_trace.pt")));
  const ImageFolder folder = scan_image_folder(fixture("models/zeroshot"));
  TextEncoder text = load_text_encoder(text_model_for(model.bundle()));
  EXPECT_EQ(text.tokenizer->end_token(), 521);
  auto [weight, bias] = zero_shot_head(text, folder.classes, class_prompt_names(folder.classes, {}), default_templates());
  model.set_head(weight, bias);
  model.set_normalize_features(true);
  LoaderOptions o;
  o.batch_size = 4;
  ImageBatchSource source(folder, Preprocess::from_bundle(model.bundle().info), o);
  source.start_epoch(0, 0);
  at::NoGradGuard no_grad;
  int64_t seen = 0;
  while (auto b = source.next()) {
    const at::Tensor logits = model.logits(b->images);
    EXPECT_TRUE(at::equal(logits.argmax(1), b->labels));
    // The text and image embeddings agree: cosine 1, logit = logit_scale.
    EXPECT_NEAR(std::get<0>(logits.max(1)).min().item<double>(), 100.0, 1e-2);
    seen += b->images.size(0);
  }
  EXPECT_EQ(seen, 9);
}

TrainConfig mobileclip_config(const std::filesystem::path& out, json extra = json::object()) {
  json j = {{"model", fixture("models/mobileclip_trace.pt").string()},
            {"data", {{"train", "-"}, {"augment", {{"enabled", false}}}}},
            {"output_dir", out.string()},
            {"epochs", 3},
            {"batch_size", 4},
            {"precision", "fp32"},
            {"optim", {{"lr", 0.01}}},
            {"lora", {{"rank", 4}, {"dropout", 0.0}}},
            {"log_every_steps", 1}};
  j.merge_patch(extra);
  return parse_train_config(j, "test");
}

std::unique_ptr<Model> lora_model(const TrainConfig& c) { return build_training_model(c, {"a", "b", "c"}); }

struct Images {
  at::Tensor x, y;
  Images() {
    at::Generator gen = at::detail::createCPUGenerator(3);
    y = at::arange(12, at::kLong) % 3;
    x = at::rand({12, 3, 64, 64}, gen) * 0.3 + y.to(at::kFloat).view({12, 1, 1, 1}) * 0.3;
  }
};

TEST(MobileClip, TrainingTouchesOnlyQAndVRowsAndKeepsBatchNormFrozen) {
  const auto dir = test::temp_dir("mobileclip_rows");
  const TrainConfig c = mobileclip_config(dir / "run");
  auto model = lora_model(c);
  std::map<std::string, at::Tensor> buffers_before;
  for (const auto& b : model->module().named_buffers()) buffers_before[b.name] = b.value.clone();
  Images data;
  TensorBatchSource train(data.x, data.y, 4, true, true, 0);
  Trainer(c, *model, train, nullptr, {"a", "b", "c"}, c10::Device(c10::kCPU), Precision::kFp32).run(false);
  for (const auto& b : model->module().named_buffers())
    EXPECT_TRUE(at::equal(b.value, buffers_before.at(b.name))) << "BatchNorm statistics must not move: " << b.name;

  merge_adapter(c.model, dir / "run" / Trainer::kLastAdapter, dir / "merged.pt", MergeOptions{});
  const Bundle base = load_bundle(c.model), merged = load_bundle(dir / "merged.pt");
  std::map<std::string, at::Tensor> merged_params;
  for (const auto& p : merged.module.named_parameters()) merged_params[p.name] = p.value;
  int qkv = 0;
  for (const auto& p : base.module.named_parameters()) {
    const at::Tensor& after = merged_params.at("backbone." + p.name);
    if (p.name.find("network.7.") != std::string::npos && p.name.find("token_mixer.qkv.weight") != std::string::npos) {
      ++qkv;
      const int64_t n = p.value.size(0) / 3;
      EXPECT_FALSE(at::equal(after.narrow(0, 0, n), p.value.narrow(0, 0, n))) << p.name << " q rows changed";
      EXPECT_TRUE(at::equal(after.narrow(0, n, n), p.value.narrow(0, n, n))) << p.name << " k rows untouched";
      EXPECT_FALSE(at::equal(after.narrow(0, 2 * n, n), p.value.narrow(0, 2 * n, n))) << p.name << " v rows changed";
    } else {
      EXPECT_TRUE(at::equal(after, p.value)) << p.name << " must be bit-identical";
    }
  }
  EXPECT_EQ(qkv, 2);
}

TEST(MobileClip, PrefixCacheGivesIdenticalTrainingWithoutAugmentation) {
  Images data, val;
  std::string metrics[2];
  std::filesystem::path dir_of[2];
  for (int cached = 0; cached < 2; ++cached) {
    const auto dir = test::temp_dir(std::string("prefix_cache_") + (cached ? "on" : "off"));
    // Adapters in the last attention block only: the stem and block 0 form the frozen prefix.
    const TrainConfig c = mobileclip_config(dir, {{"data", {{"prefix_cache", cached ? "memory" : "off"}}},
                                                  {"lora", {{"targets", {"network.7.1.token_mixer.qkv:q,v"}}}}});
    auto model = lora_model(c);
    EXPECT_EQ(model->frozen_prefix_blocks(), 1);
    TensorBatchSource train(data.x, data.y, 4, true, true, 0);
    TensorBatchSource validation(val.x, val.y, 5, false, false, 0);
    Trainer(c, *model, train, &validation, {"a", "b", "c"}, c10::Device(c10::kCPU), Precision::kFp32).run(false);
    dir_of[cached] = dir;
    metrics[cached] = read_file(dir / Trainer::kMetrics);
  }
  // The same computation up to float rounding: BLAS kernels treat a row differently by its position in the batch,
  // and cached rows are batched with other rows than when they were computed, so the last bits may differ.
  const auto a0 = load_adapter(dir_of[0] / Trainer::kLastAdapter), a1 = load_adapter(dir_of[1] / Trainer::kLastAdapter);
  for (size_t i = 0; i < a0.targets.size(); ++i) EXPECT_LT(test::scaled_diff(a1.targets[i].B(), a0.targets[i].B()), 1e-5);
  // Losses (the lines differ only in timing fields).
  auto losses = [](const std::string& text) {
    std::vector<double> out;
    std::istringstream in(text);
    for (std::string line; std::getline(in, line);) {
      const json j = json::parse(line);
      out.push_back(j.contains("loss") ? j["loss"].get<double>() : j["val_loss"].get<double>());
    }
    return out;
  };
  const auto l0 = losses(metrics[0]), l1 = losses(metrics[1]);
  ASSERT_EQ(l0.size(), l1.size());
  for (size_t i = 0; i < l0.size(); ++i) EXPECT_NEAR(l0[i], l1[i], 1e-6 * std::abs(l0[i])) << "line " << i;
}

// The model of the contrastive reference: both towers, the PEFT-style adapter on both (routed by which tower has
// each module: the file has no tower marks).
std::unique_ptr<Model> contrastive_model(bool with_adapter = true) {
  auto model = std::make_unique<Model>(load_bundle(fixture("models/mobileclip_trace.pt")));
  model->set_text_tower(load_bundle(fixture("models/mobileclip_text.pt")));
  if (with_adapter) apply_adapter(*model, load_adapter(fixture("models/adapter_contrastive")), "adapter_contrastive");
  return model;
}

std::string peft_key(const LoraTarget& t, const std::string& tensor) {
  return "base_model.model." + t.module + ".lora_" + tensor + "." + t.slice + ".weight";
}

TEST(Contrastive, LossAndGradientsThroughBothTowersMatchPython) {
  const auto ref = safetensors::read(fixture("models/ref_contrastive.safetensors")).tensors;
  for (bool checkpoint : {false, true}) {
    SCOPED_TRACE(checkpoint ? "with checkpointing" : "without checkpointing");
    auto model = contrastive_model();
    ASSERT_EQ(model->adapters().size(), 4u);       // q and v of the last stage's 2 attention blocks
    ASSERT_EQ(model->text_adapters().size(), 4u);  // q and v of the 2 text blocks
    EXPECT_EQ(model->trainable().size(), 16u);     // A and B of each; the head (none here) would not train
    const at::Tensor loss = contrastive_loss(model->features(ref.at("input"), checkpoint),
                                             model->text_features(ref.at("tokens").to(at::kLong), checkpoint),
                                             ref.at("logit_scale").item<double>());
    EXPECT_NEAR(loss.item<double>(), ref.at("loss").item<double>(), 1e-5);
    loss.backward();
    for (const auto* targets : {&model->adapters(), &model->text_adapters()})
      for (const auto& t : *targets) {
        SCOPED_TRACE(t.describe());
        EXPECT_LT(test::scaled_diff(t.A().grad(), ref.at("grad." + peft_key(t, "A"))), 1e-4);
        EXPECT_LT(test::scaled_diff(t.B().grad(), ref.at("grad." + peft_key(t, "B"))), 1e-4);
      }
  }
}

TEST(Contrastive, AdapterFilesMarkTheTextTowerAndModelsWithoutItKeepOnlyTheHead) {
  auto model = contrastive_model();
  model->init_head(3);
  const auto dir = test::temp_dir("contrastive_adapter");
  save_adapter(dir / "a", adapter_from_model(*model, {"blue", "green", "red"}, json::object()));
  const Adapter a = load_adapter(dir / "a");
  ASSERT_EQ(a.targets.size(), 4u);
  ASSERT_EQ(a.text_targets.size(), 4u);
  EXPECT_EQ(a.text_targets[0].module.rfind("text_encoder.", 0), 0u);
  EXPECT_EQ(a.text_base_fingerprint, model->text_bundle().fingerprint);
  // Without the text tower: the image adapters and the head; with it: both towers, equal to the source model's.
  Model image_only(load_bundle(fixture("models/mobileclip_trace.pt")));
  apply_adapter(image_only, a, "a");
  EXPECT_EQ(image_only.adapters().size(), 4u);
  auto both = contrastive_model(false);
  apply_adapter(*both, a, "a");
  ASSERT_EQ(both->text_adapters().size(), 4u);
  const at::Tensor tokens = at::randint(1, 100, {2, 77}, at::kLong);
  at::NoGradGuard no_grad;
  EXPECT_TRUE(at::equal(both->text_features(tokens), model->text_features(tokens)));
  // Another text tower (other weights, same shapes) is refused by fingerprint.
  auto other = std::make_unique<Model>(load_bundle(fixture("models/mobileclip_trace.pt")));
  Bundle text = load_bundle(fixture("models/mobileclip_text.pt"));
  text.fingerprint = "0000";
  other->set_text_tower(std::move(text));
  EXPECT_THROW_WITH(apply_adapter(*other, a, "a"), InputError, "trained with a different text tower");
}

}  // namespace
}  // namespace loratune
