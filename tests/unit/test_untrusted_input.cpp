// Untrusted input: patterns, adapter files and bundles that are hostile or damaged. Every case must end in a clear
// InputError (or load), never a crash, a hang or another exception; mutation loops are bounded in count and time.
#include <ATen/core/grad_mode.h>
#include <gtest/gtest.h>

#include <chrono>
#include <fstream>
#include <random>

#include "common/pattern_match.h"
#include "loratune/adapter_binding.h"
#include "loratune/targets.h"
#include "loratune/bundle.h"
#include "loratune/errors.h"
#include "loratune/import.h"
#include "loratune/threads.h"
#include "common/files.h"
#include "loratune/model.h"
#include "loratune/safetensors.h"
#include "test_support.h"

namespace loratune {
namespace {

using nlohmann::json;
namespace fs = std::filesystem;

TEST(PatternMatcher, MatchesLikeECMAScriptOnWholeStrings) {
  struct Case {
    const char* pattern;
    const char* text;
    bool match;
  };
  const Case cases[] = {
      {"blocks\\.\\d+\\.attn\\.qkv", "blocks.11.attn.qkv", true},
      {"blocks\\.\\d+\\.attn\\.qkv", "blocks.11.attn.qkv2", false},
      {".*\\.(query|value)", "vit.encoder.layer.0.attention.attention.value", true},
      {".*\\.(query|value)", "vit.encoder.layer.0.attention.attention.key", false},
      {"(.*\\.)?(qkv)", "qkv", true},
      {"(.*\\.)?(qkv)", "xqkv", false},
      {"a{2,3}b?", "aaab", true},
      {"a{2,3}b?", "ab", false},
      {"[^.]+\\.[a-c]+", "layer.cab", true},
      {"^layer\\.[0-9]{1,2}$", "layer.42", true},
      {"(?:ab)*", "", true},
      {"x|", "", true},
  };
  for (const auto& c : cases)
    EXPECT_EQ(PatternMatcher(c.pattern, "test").full_match(c.text), c.match) << c.pattern << " ~ " << c.text;
}

TEST(PatternMatcher, HostilePatternsFailFastOrMatchInLinearTime) {
  const std::string long_name(30000, 'a');
  const auto start = std::chrono::steady_clock::now();
  EXPECT_FALSE(PatternMatcher("(a*)*c", "test").full_match(long_name));       // exponential for backtracking
  EXPECT_TRUE(PatternMatcher("(a|aa)*(a|aa)*", "test").full_match(long_name));
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), 5.0);
  EXPECT_THROW_WITH(PatternMatcher(std::string(200, '(') + "a" + std::string(200, ')'), "test"), InputError,
                    "nested deeper than 32");
  EXPECT_THROW_WITH(PatternMatcher(std::string(5000, 'a'), "test"), InputError, "longer than 1024");
  EXPECT_THROW_WITH(PatternMatcher("((a{100}){100}){5}", "test"), InputError, "too large");
  EXPECT_THROW_WITH(PatternMatcher("(a)\\1", "test"), InputError, "back-references are not supported");
  EXPECT_THROW_WITH(PatternMatcher("(?=a)", "test"), InputError, "look-arounds");
  EXPECT_THROW_WITH(PatternMatcher("a)", "test"), InputError, "unbalanced )");
  EXPECT_THROW_WITH(PatternMatcher("[a-", "test"), InputError, "unclosed [");
  EXPECT_THROW_WITH(PatternMatcher("*a", "test"), InputError, "nothing to repeat");
}

// A valid loratune adapter (non-zero B, a head) for the hf fixture, saved in `dir`/adapter.
fs::path write_adapter(const fs::path& dir) {
  Model model(load_bundle(test::fixture("models/hf_script.pt")));
  auto targets = resolve_targets(model.module(), LoraSettings{});
  init_adapter_tensors(targets, model.module());
  {
    at::NoGradGuard no_grad;
    for (auto& t : targets) t.B().normal_(0, 0.1);
  }
  model.set_adapters(targets, LoraSettings{});
  model.head().init(3);
  save_adapter(dir / "adapter", adapter_from_model(model, {"a", "b", "c"}, {}));
  return dir / "adapter";
}

// Rewrites the tensors as another tool would (without loratune's checksum), so that the later checks are reached.
void rewrite_weights(const fs::path& adapter, const std::function<void(safetensors::Contents&)>& edit) {
  auto contents = safetensors::read(adapter / kAdapterWeightsName);
  contents.metadata.erase("tensors_hash");
  edit(contents);
  safetensors::write(adapter / kAdapterWeightsName, contents.tensors, contents.metadata);
}

json loratune_meta(const safetensors::Contents& c) { return json::parse(c.metadata.at("loratune")); }

// A copy of the adapter folder `good`, beside it under `name`, with its tensors rewritten by `edit`.
fs::path edited_copy(const fs::path& good, const std::string& name, const std::function<void(safetensors::Contents&)>& edit) {
  const fs::path copy = good.parent_path() / name;
  fs::copy(good, copy, fs::copy_options::recursive);
  rewrite_weights(copy, edit);
  return copy;
}

// SSF files: vectors that disagree with each other or with the base, a missing shift, LoRA tensors in an SSF file and
// SSF tensors in a LoRA file are refused by name.
TEST(UntrustedAdapter, DamagedSsfFilesAreRefusedByName) {
  const fs::path dir = test::temp_dir("hostile_ssf");
  Model model(load_bundle(test::fixture("models/hf_script.pt")));
  LoraSettings settings;
  settings.variant = "ssf";
  auto targets = resolve_targets(model.module(), settings);
  init_adapter_tensors(targets, model.module());
  model.set_adapters(targets, settings);
  model.head().init(3);
  save_adapter(dir / "good", adapter_from_model(model, {"a", "b", "c"}, {}));
  ASSERT_NO_THROW(load_adapter(dir / "good"));
  auto edited = [&](const std::string& name, const std::function<void(safetensors::Contents&)>& edit) {
    return edited_copy(dir / "good", name, edit);
  };
  const std::string shift = "base_model.model.vit.encoder.layer.0.attention.attention.query.lora_ssf_shift.weight";
  EXPECT_THROW_WITH(load_adapter(edited("short_shift", [&](safetensors::Contents& c) { c.tensors[shift] = at::zeros({31}); })),
                    InputError, "adapter vit.encoder.layer.0.attention.attention.query [32] ssf has lora_ssf_shift of shape [31], not [32]");
  EXPECT_THROW_WITH(load_adapter(edited("no_shift", [&](safetensors::Contents& c) { c.tensors.erase(shift); })), InputError,
                    "has no lora_ssf_shift");
  EXPECT_THROW_WITH(load_adapter(edited("lora_in_ssf", [&](safetensors::Contents& c) { c.tensors[std::string(shift).replace(shift.find("ssf_shift"), 9, "A")] = at::zeros({4, 32}); })),
                    InputError, "belongs to another adapter variant than ssf");
  const fs::path wide = edited("wide", [&](safetensors::Contents& c) {
    for (auto& [k, t] : c.tensors)
      if (k.find("lora_ssf") != std::string::npos) t = at::ones({64});
  });
  Model other(load_bundle(test::fixture("models/hf_script.pt")));
  EXPECT_THROW_WITH(apply_adapter(other, load_adapter(wide), "wide"), InputError, "was made for another base");
  const fs::path lora = write_adapter(dir / "lora");
  rewrite_weights(lora, [&](safetensors::Contents& c) { c.tensors[shift] = at::zeros({32}); });
  EXPECT_THROW_WITH(load_adapter(lora), InputError, "belongs to another adapter variant than lora");
}

// VPT files: missing or extra prompt sets, sets of another width, prompts under another method are refused by name.
TEST(UntrustedAdapter, DamagedVptFilesAreRefusedByName) {
  const fs::path dir = test::temp_dir("hostile_vpt");
  Model model(load_bundle(test::fixture("models/hf_script.pt")));
  model.set_method(Method::kVpt);
  model.init_prompts(PromptSettings{4, true});
  model.head().init(3);
  save_adapter(dir / "good", adapter_from_model(model, {"a", "b", "c"}, {}));
  ASSERT_NO_THROW(load_adapter(dir / "good"));
  auto edited = [&](const std::string& name, const std::function<void(safetensors::Contents&)>& edit) {
    return edited_copy(dir / "good", name, edit);
  };
  EXPECT_THROW_WITH(load_adapter(edited("gap", [](safetensors::Contents& c) { c.tensors.erase("prompt_embeddings.0"); })),
                    InputError, "prompts for block 0 are missing");
  EXPECT_THROW_WITH(load_adapter(edited("shallow_key", [](safetensors::Contents& c) {
                      c.tensors["prompt_embeddings"] = at::zeros({4, 32});
                    })),
                    InputError, "its prompt keys do not match vpt.deep true");
  EXPECT_THROW_WITH(load_adapter(edited("not_vpt", [](safetensors::Contents& c) {
                      json m = loratune_meta(c);
                      m["method"] = "linear_probe";
                      c.metadata["loratune"] = m.dump();
                    })),
                    InputError, "holds prompt tokens, but its method is linear_probe");
  const fs::path wide = edited("wide", [](safetensors::Contents& c) {
    for (auto& [k, t] : c.tensors)
      if (k.rfind("prompt_embeddings", 0) == 0) t = at::zeros({4, 64});
  });
  Model other(load_bundle(test::fixture("models/hf_script.pt")));
  EXPECT_THROW_WITH(apply_adapter(other, load_adapter(wide), "wide"), InputError,
                    "wide holds prompts of shape [4, 64]; the model takes [4, 32]: it was made for another base");
  const fs::path extra = edited("extra", [](safetensors::Contents& c) { c.tensors["prompt_embeddings.2"] = at::zeros({4, 32}); });
  EXPECT_THROW_WITH(apply_adapter(other, load_adapter(extra), "extra"), InputError,
                    "extra holds 3 prompt sets; deep prompts need one per block (2)");
}

// AdaptFormer files: a missing tensor or block, a stray key, adapters under another method or of another width are
// refused by name.
TEST(UntrustedAdapter, DamagedAdaptFormerFilesAreRefusedByName) {
  const fs::path dir = test::temp_dir("hostile_adaptformer");
  Model model(load_bundle(test::fixture("models/hf_script.pt")));
  model.set_method(Method::kAdaptFormer);
  model.init_mlp_adapters(AdaptFormerSettings{4, 0.1});
  model.head().init(3);
  save_adapter(dir / "good", adapter_from_model(model, {"a", "b", "c"}, {}));
  ASSERT_NO_THROW(load_adapter(dir / "good"));
  auto edited = [&](const std::string& name, const std::function<void(safetensors::Contents&)>& edit) {
    return edited_copy(dir / "good", name, edit);
  };
  EXPECT_THROW_WITH(load_adapter(edited("no_up", [](safetensors::Contents& c) { c.tensors.erase("adaptformer.1.up.weight"); })),
                    InputError, "the adapter of block 1 has no up.weight");
  EXPECT_THROW_WITH(load_adapter(edited("gap", [](safetensors::Contents& c) {
                      for (const auto& n : adaptformer_tensor_names()) c.tensors.erase("adaptformer.0." + n);
                    })),
                    InputError, "the adapter of block 0 is missing");
  EXPECT_THROW_WITH(load_adapter(edited("stray", [](safetensors::Contents& c) { c.tensors["adaptformer.0.side.weight"] = at::zeros({2}); })),
                    InputError, "tensor adaptformer.0.side.weight is not an AdaptFormer tensor");
  EXPECT_THROW_WITH(load_adapter(edited("not_af", [](safetensors::Contents& c) {
                      json m = loratune_meta(c);
                      m["method"] = "linear_probe";
                      c.metadata["loratune"] = m.dump();
                    })),
                    InputError, "holds AdaptFormer adapters, but its method is linear_probe");
  const fs::path wide = edited("wide", [](safetensors::Contents& c) {
    json m = loratune_meta(c);
    m["adaptformer"]["bottleneck"] = 8;
    c.metadata["loratune"] = m.dump();
  });
  Model other(load_bundle(test::fixture("models/hf_script.pt")));
  EXPECT_THROW_WITH(apply_adapter(other, load_adapter(wide), "wide"), InputError,
                    "wide holds an adapter down.weight that does not fit [8, 32] (bottleneck 8, width 32)");
}

TEST(UntrustedAdapter, DamagedFilesAreInputErrorsNamingTheFile) {
  const fs::path dir = test::temp_dir("hostile_adapter");
  const fs::path good = write_adapter(dir);
  ASSERT_NO_THROW(load_adapter(good));
  auto variant = [&](const std::string& name, const std::function<void(safetensors::Contents&)>& edit) {
    return edited_copy(good, name, edit);
  };
  const fs::path long_name = variant("long_name", [](safetensors::Contents& c) {
    c.tensors["base_model.model." + std::string(30000, 'x') + ".lora_A.weight"] = at::zeros({2, 2});
  });
  EXPECT_THROW_WITH(load_adapter(long_name), InputError, "limit 4096");
  const fs::path nan = variant("nan", [](safetensors::Contents& c) {
    for (auto& [k, t] : c.tensors)
      if (k.find("lora_B") != std::string::npos) t = t.clone().fill_(std::nan(""));
  });
  EXPECT_THROW_WITH(load_adapter(nan), InputError, "NaN or infinite");
  const fs::path rank0 = variant("rank0", [](safetensors::Contents& c) {
    for (auto& [k, t] : c.tensors)
      if (k.find("lora_A") != std::string::npos) t = at::zeros({0, t.size(1)});
      else if (k.find("lora_B") != std::string::npos) t = at::zeros({t.size(0), 0});
  });
  EXPECT_THROW_WITH(load_adapter(rank0), InputError, "rank 0");
  const fs::path broken_meta = variant("broken_meta", [](safetensors::Contents& c) {
    json m = loratune_meta(c);
    m["targets"][0]["alpha"] = "sixteen";
    c.metadata["loratune"] = m.dump();
  });
  EXPECT_THROW_WITH(load_adapter(broken_meta), InputError, "metadata is damaged");
  // The settings follow the rules a config's keys follow.
  const fs::path bad_dropout = variant("bad_dropout", [](safetensors::Contents& c) {
    json m = loratune_meta(c);
    m["lora"]["dropout"] = 1.5;
    c.metadata["loratune"] = m.dump();
  });
  EXPECT_THROW_WITH(load_adapter(bad_dropout), InputError, "lora.dropout must be in [0, 1) (got 1.5)");
  const fs::path other_variant = variant("other_variant", [](safetensors::Contents& c) {
    json m = loratune_meta(c);
    m["lora"]["variant"] = "vera";
    c.metadata["loratune"] = m.dump();
  });
  EXPECT_THROW_WITH(load_adapter(other_variant / kAdapterWeightsName), InputError,
                    "lora.variant must be lora, dora, lora_fa or ssf (got \"vera\")");
  EXPECT_THROW_WITH(load_adapter(other_variant), InputError, "lora.variant must be lora, dora, lora_fa or ssf (got \"vera\")");
  const fs::path future = variant("future", [](safetensors::Contents& c) { c.metadata["format"] = "loratune.adapter/999"; });
  EXPECT_THROW_WITH(load_adapter(future), InputError, "is a loratune.adapter/999 adapter; this loratune reads loratune.adapter/1");
  const fs::path rank_key = variant("rank_key", [](safetensors::Contents& c) {
    json m = loratune_meta(c);
    m["lora"]["rank_pattern"] = {{"(", 4}};
    c.metadata["loratune"] = m.dump();
  });
  EXPECT_THROW_WITH(load_adapter(rank_key / kAdapterWeightsName), InputError, "rank_pattern key");
  const fs::path not_json = variant("not_json", [](safetensors::Contents& c) { c.metadata["loratune"] = "{\"method\":"; });
  EXPECT_THROW_WITH(load_adapter(not_json), InputError, "metadata is damaged");

  // One flipped bit in the data of a loratune adapter: its checksum no longer matches.
  const fs::path flipped = dir / "flipped";
  fs::copy(good, flipped, fs::copy_options::recursive);
  std::string bytes = read_file(flipped / kAdapterWeightsName);
  bytes[bytes.size() - 3] = static_cast<char>(bytes[bytes.size() - 3] ^ 0x01);
  write_file_atomic(flipped / kAdapterWeightsName, bytes);
  EXPECT_THROW_WITH(load_adapter(flipped), InputError, "do not match the checksum");
  EXPECT_THROW_WITH(write_file_durable("/dev/full", "x"), RuntimeFailure, "the disk is full");

  // adapter_config.json is what PEFT reads: it must agree with the metadata.
  const fs::path disagree = dir / "disagree";
  fs::copy(good, disagree, fs::copy_options::recursive);
  json config = json::parse(read_file(disagree / kAdapterConfigName));
  config["lora_alpha"] = 1.0;
  write_file_atomic(disagree / kAdapterConfigName, config.dump());
  EXPECT_THROW_WITH(load_adapter(disagree), InputError, "disagrees with the settings inside");
  EXPECT_THROW_WITH(load_adapter(disagree), InputError, "(lora_alpha 1.0 vs ");
  config = json::parse(read_file(good / kAdapterConfigName));
  config["use_dora"] = true;
  write_file_atomic(disagree / kAdapterConfigName, config.dump());
  EXPECT_THROW_WITH(load_adapter(disagree), InputError, "(use_dora true vs false)");
  write_file_atomic(disagree / kAdapterConfigName, "{not json");
  EXPECT_THROW_WITH(load_adapter(disagree), InputError, "not valid JSON");
}

// An adapter without loratune's metadata, so that its settings come from adapter_config.json as PEFT's do.
fs::path write_peft_adapter(const fs::path& dir) {
  const fs::path adapter = write_adapter(dir);
  rewrite_weights(adapter, [](safetensors::Contents& c) { c.metadata.erase("loratune"); });
  return adapter;
}

TEST(UntrustedAdapter, PeftPatternsCannotHangOrCrash) {
  const fs::path adapter = write_peft_adapter(test::temp_dir("peft_patterns"));
  json config = json::parse(read_file(adapter / kAdapterConfigName));
  const auto start = std::chrono::steady_clock::now();
  config["alpha_pattern"] = {{"(a*)*c", 4.0}, {"query", 2.0}};
  write_file_atomic(adapter / kAdapterConfigName, config.dump());
  const Adapter a = load_adapter(adapter);
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), 5.0);
  for (const auto& t : a.targets) EXPECT_EQ(t.alpha, t.module.size() >= 5 && t.module.rfind("query") == t.module.size() - 5
                                                         ? 2.0 : config["lora_alpha"].get<double>()) << t.module;
  config["alpha_pattern"] = {{std::string(500, '(') + "q" + std::string(500, ')'), 4.0}};
  write_file_atomic(adapter / kAdapterConfigName, config.dump());
  EXPECT_THROW_WITH(load_adapter(adapter), InputError, "alpha_pattern key");
}

// PEFT writes a PiSSA / OLoRA / CorDA / LoftQ adapter as trained, for a base it changed, unless converted on saving
// (which writes init_lora_weights true): such a file is refused with the fix; starts that leave the base are read.
TEST(UntrustedAdapter, PeftStartsThatChangedTheBaseAreRefusedWithTheFix) {
  const fs::path adapter = write_peft_adapter(test::temp_dir("peft_starts"));
  json config = json::parse(read_file(adapter / kAdapterConfigName));
  for (const char* start : {"pissa", "pissa_niter_16", "olora", "corda", "loftq"}) {
    config["init_lora_weights"] = start;
    write_file_atomic(adapter / kAdapterConfigName, config.dump());
    EXPECT_THROW_WITH(load_adapter(adapter), InputError,
                      "init_lora_weights \"" + std::string(start) + "\" means the adapter applies to a base that PEFT "
                      "changed at its start; save it in PEFT with save_pretrained(..., "
                      "path_initial_model_for_weight_conversion=...)");
  }
  for (const json start : {json("gaussian"), json(true), json(false)}) {
    config["init_lora_weights"] = start;
    write_file_atomic(adapter / kAdapterConfigName, config.dump());
    EXPECT_NO_THROW(load_adapter(adapter)) << start;
  }
}

// PEFT 0.21 writes null for unset fields (seen on the GPU machine: a model built from a config has
// "base_model_name_or_path": null); null reads as absent, a wrong type is still an error.
TEST(UntrustedAdapter, PeftConfigNullsReadAsUnset) {
  const fs::path adapter = write_peft_adapter(test::temp_dir("peft_nulls"));
  json config = json::parse(read_file(adapter / kAdapterConfigName));
  for (const char* key : {"base_model_name_or_path", "task_type", "revision", "layers_to_transform", "layers_pattern",
                          "lora_dropout", "use_rslora", "use_dora"})
    config[key] = nullptr;
  write_file_atomic(adapter / kAdapterConfigName, config.dump());
  const Adapter a = load_adapter(adapter);
  EXPECT_EQ(a.base_name, "");
  EXPECT_EQ(a.lora.dropout, 0.0);
  EXPECT_FALSE(a.lora.rslora);
  EXPECT_EQ(a.lora.variant, "lora");
  config["base_model_name_or_path"] = 3;
  write_file_atomic(adapter / kAdapterConfigName, config.dump());
  EXPECT_THROW_WITH(load_adapter(adapter), InputError, "not a PEFT LoRA config");
}

TEST(UntrustedBundle, MetadataSizesThatWouldMakeHugeAllocationsAreRefused) {
  const json good = load_bundle(test::fixture("models/hf_script.pt")).info.to_json();
  const std::pair<json, const char*> cases[] = {
      {{{"image_size", 1000000}, {"resize_size", 1000000}}, "image_size <= resize_size <= 4096 (got 1000000, 1000000)"},
      {{{"feature_dim", 1000000}}, "feature_dim must be from 1 to 65536 (got 1000000)"},
      {{{"mean", {0.5, 1e39, 0.5}}}, "metadata mean values must be finite"},
  };
  for (const auto& [patch, message] : cases) {
    json j = good;
    j.merge_patch(patch);
    EXPECT_THROW_WITH(BundleInfo::from_json(j, "b.pt"), InputError, message);
  }
  EXPECT_NO_THROW(BundleInfo::from_json(good, "b.pt"));
}

TEST(UntrustedSafetensors, DeepJsonAndHugeCountsAreRefused) {
  std::string deep = "{\"a\":" + std::string(100000, '[') + std::string(100000, ']') + "}";
  std::string bytes(8, '\0');
  for (int i = 0; i < 8; ++i) bytes[i] = static_cast<char>((deep.size() >> (8 * i)) & 0xff);
  EXPECT_THROW_WITH(safetensors::parse(bytes + deep, "deep.safetensors"), InputError, "deep.safetensors");
}

TEST(Fuzz, AdapterReaderTurnsEveryMutationIntoAnInputError) {
  const fs::path dir = test::temp_dir("fuzz_adapter");
  const fs::path adapter = write_adapter(dir);
  const std::string original = read_file(adapter / kAdapterWeightsName);
  EXPECT_GT(test::fuzz(original, adapter / kAdapterWeightsName, 20000, 20.0, [&] { load_adapter(adapter); }).mutations, 100);
}

TEST(Fuzz, BundleLoaderTurnsEveryMutationIntoAnInputError) {
  const fs::path dir = test::temp_dir("fuzz_bundle");
  const std::string original = read_file(test::fixture("models/hf_trace.pt"));
  EXPECT_GT(test::fuzz(original, dir / "model.pt", 3000, 20.0, [&] { load_bundle(dir / "model.pt"); }).mutations, 20);
}

// Checkpoint folders made here from random tensors (a 1-block ViT, width 32, 2 heads, patch 8, 32 px), in the
// layouts of timm and transformers, then mutated as a fuzzer would: every config value replaced by values of the
// wrong kind or size, every tensor by one of the wrong rank, size or type. import_checkpoint must give a bundle whose
// forward runs, or an InputError; never another exception, a crash (the sanitizer job runs this) or a hang.
struct CheckpointFolder {
  json config;
  safetensors::Tensors tensors;
};

CheckpointFolder tiny_timm_folder() {
  const int64_t C = 32, patches = 16;
  CheckpointFolder f;
  f.config = {{"architecture", "vit_tiny_patch16_224.augreg_in21k"},
              {"num_classes", 0},
              {"model_args", {{"embed_dim", C}, {"num_heads", 2}, {"depth", 1}, {"patch_size", 8}, {"img_size", 32}}},
              {"pretrained_cfg", {{"input_size", {3, 32, 32}}, {"crop_pct", 0.9}, {"interpolation", "bicubic"},
                                  {"mean", {0.5, 0.5, 0.5}}, {"std", {0.5, 0.5, 0.5}}}}};
  auto& t = f.tensors;
  t["cls_token"] = at::randn({1, 1, C});
  t["pos_embed"] = at::randn({1, 1 + patches, C});
  t["patch_embed.proj.weight"] = at::randn({C, 3, 8, 8}) * 0.05;
  t["patch_embed.proj.bias"] = at::randn({C});
  for (const char* norm : {"blocks.0.norm1", "blocks.0.norm2", "norm"})
    t[std::string(norm) + ".weight"] = at::ones({C}), t[std::string(norm) + ".bias"] = at::zeros({C});
  for (auto [name, out, in] : {std::tuple<const char*, int64_t, int64_t>{"blocks.0.attn.qkv", 3 * C, C},
                               {"blocks.0.attn.proj", C, C}, {"blocks.0.mlp.fc1", 4 * C, C}, {"blocks.0.mlp.fc2", C, 4 * C}})
    t[std::string(name) + ".weight"] = at::randn({out, in}) * 0.1, t[std::string(name) + ".bias"] = at::randn({out}) * 0.1;
  return f;
}

CheckpointFolder tiny_transformers_folder() {
  const int64_t C = 32;
  CheckpointFolder f;
  f.config = {{"model_type", "vit"}, {"hidden_size", C}, {"num_hidden_layers", 1}, {"num_attention_heads", 2},
              {"intermediate_size", 4 * C}, {"image_size", 32}, {"patch_size", 8}, {"num_channels", 3},
              {"hidden_act", "gelu"}, {"layer_norm_eps", 1e-12}, {"qkv_bias", true}};
  auto& t = f.tensors;
  const std::string e = "vit.embeddings.", l = "vit.encoder.layer.0.";
  t[e + "cls_token"] = at::randn({1, 1, C});
  t[e + "position_embeddings"] = at::randn({1, 17, C});
  t[e + "patch_embeddings.projection.weight"] = at::randn({C, 3, 8, 8}) * 0.05;
  t[e + "patch_embeddings.projection.bias"] = at::randn({C});
  for (const std::string norm : {l + "layernorm_before", l + "layernorm_after", std::string("vit.layernorm")})
    t[norm + ".weight"] = at::ones({C}), t[norm + ".bias"] = at::zeros({C});
  for (auto [name, out, in] : {std::tuple<std::string, int64_t, int64_t>{"attention.attention.query", C, C},
                               {"attention.attention.key", C, C}, {"attention.attention.value", C, C},
                               {"attention.output.dense", C, C}, {"intermediate.dense", 4 * C, C},
                               {"output.dense", C, 4 * C}})
    t[l + name + ".weight"] = at::randn({out, in}) * 0.1, t[l + name + ".bias"] = at::randn({out}) * 0.1;
  return f;
}

void write_folder(const fs::path& dir, const CheckpointFolder& f) {
  fs::remove_all(dir);
  fs::create_directories(dir);
  std::ofstream(dir / "config.json") << f.config.dump();
  safetensors::write(dir / "model.safetensors", f.tensors, {});
}

// Every leaf of a JSON object, as a JSON pointer.
void leaves(const json& j, const json::json_pointer& at, std::vector<json::json_pointer>& out) {
  if (j.is_object() && !j.empty()) {
    for (const auto& [k, v] : j.items()) leaves(v, at / k, out);
  } else if (j.is_array() && !j.empty()) {
    for (size_t i = 0; i < j.size(); ++i) leaves(j[i], at / i, out);
  } else {
    out.push_back(at);
  }
}

// "bundle" or "error"; anything else fails the test.
std::string import_outcome(const fs::path& dir, const std::string& what) {
  try {
    ImportedModel m = import_checkpoint(dir.string());
    const int64_t size = m.metadata.value("image_size", 32);
    if (size > 64) return "bundle";  // a larger input size is valid; running it adds nothing but time
    at::NoGradGuard no_grad;
    m.module.forward({at::randn({1, 3, size, size})});
    return "bundle";
  } catch (const InputError&) {
    return "error";
  } catch (const std::exception& e) {
    ADD_FAILURE() << what << ": not an InputError: " << e.what();
    return "other";
  }
}

TEST(UntrustedCheckpointFolder, MutatedConfigsAndTensorsAreInputErrorsOrWorkingModels) {
  set_compute_threads(1);
  const fs::path dir = test::temp_dir("fuzz_import") / "folder";
  const json values[] = {0, -1, int64_t{1} << 40, 0.5, "x", nullptr, json::array(), json::array({0}), json::object(),
                         true, 1e300};
  std::mt19937 rng(3);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(240);
  for (const auto& [family, make] : {std::pair<const char*, CheckpointFolder (*)()>{"timm", tiny_timm_folder},
                                     {"transformers", tiny_transformers_folder}}) {
    const CheckpointFolder good = make();
    write_folder(dir, good);
    ASSERT_EQ(import_outcome(dir, "the unmutated folder"), "bundle") << family;
    std::map<std::string, int> outcomes;
    std::vector<json::json_pointer> paths;
    leaves(good.config, json::json_pointer(), paths);
    for (const auto& path : paths)
      for (const json& value : values) {
        CheckpointFolder f = good;
        f.config[path] = value;
        write_folder(dir, f);
        ++outcomes["config " + import_outcome(dir, std::string(family) + " " + path.to_string() + " = " + value.dump())];
      }
    for (const auto& [key, tensor] : good.tensors) {
      const std::vector<std::pair<const char*, at::Tensor>> mutants = {
          {"0-d", at::ones({})}, {"empty", tensor.narrow(0, 0, 0).clone()}, {"integer", tensor.to(at::kLong)},
          {"extra dimension", tensor.unsqueeze(0)}, {"longer", at::cat({tensor, tensor})},
          {"nan", tensor.clone().fill_(std::nan(""))}};
      for (const auto& [how, mutant] : mutants) {
        CheckpointFolder f = good;
        f.tensors[key] = mutant;
        write_folder(dir, f);
        ++outcomes["tensor " + import_outcome(dir, std::string(family) + " " + key + " " + how)];
      }
    }
    // Random byte flips in the weights file (its header included).
    write_folder(dir, good);
    const std::string bytes = read_file(dir / "model.safetensors");
    for (int k = 0; k < 60 && std::chrono::steady_clock::now() < deadline; ++k) {
      std::string damaged = bytes;
      const size_t at = rng() % std::min<size_t>(damaged.size(), k % 2 ? damaged.size() : 512);
      damaged[at] = static_cast<char>(rng());
      std::ofstream(dir / "model.safetensors", std::ios::binary) << damaged;
      ++outcomes["bytes " + import_outcome(dir, std::string(family) + " byte " + std::to_string(at))];
    }
    std::string summary;
    for (const auto& [outcome, n] : outcomes) summary += " " + outcome + ": " + std::to_string(n) + ";";
    std::printf("%s folders:%s\n", family, summary.c_str());
    EXPECT_EQ(outcomes.count("config other") + outcomes.count("tensor other") + outcomes.count("bytes other"), 0u);
  }
}

}  // namespace
}  // namespace loratune
