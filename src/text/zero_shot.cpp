#include "loratune/zero_shot.h"

#include <ATen/core/grad_mode.h>
#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include <spdlog/spdlog.h>

#include "loratune/errors.h"
#include "loratune/import.h"
#include "loratune/sentencepiece_tokenizer.h"
#include "common/files.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace loratune {

TextEncoder load_text_encoder(const fs::path& given) {
  return text_encoder_of(load_bundle(text_tower_path(given)));
}

TextEncoder text_encoder_of(const Bundle& b) {
  const fs::path& path = b.path;
  if (b.info.kind != "text_encoder")
    throw InputError(path.string() + " is not a text encoder bundle (kind \"" + b.info.kind +
                     "\"); export one with scripts/export/apple_mobileclip.py or import a CLIP checkpoint folder");
  // The tokenizer's file travels inside the bundle (in memory for an imported folder).
  const bool sentencepiece = b.info.extra.value("tokenizer", "clip_bpe") == "sentencepiece";
  const std::string file_name = sentencepiece ? b.info.extra.value("tokenizer_file", "spiece.model")
                                              : b.info.extra.value("merges_file", "bpe_merges.txt");
  torch::jit::ExtraFilesMap extra{{file_name, ""}};
  if (b.extra_files.count(file_name)) extra[file_name] = b.extra_files.at(file_name);
  else torch::jit::load(path.string(), c10::Device(c10::kCPU), extra);
  if (extra[file_name].empty()) throw InputError(path.string() + " carries no tokenizer file (" + file_name + ")");
  std::shared_ptr<const TextTokenizer> tokenizer;
  if (sentencepiece) {
    SentencePieceOptions options;
    options.lowercase = b.info.extra.value("lowercase", false);
    options.strip_punctuation = b.info.extra.value("strip_punctuation", false);
    options.pad_with_end = b.info.extra.value("pad_with_end", false);
    tokenizer = std::make_shared<SentencePieceTokenizer>(extra[file_name], options);
  } else {
    tokenizer = std::make_shared<ClipTokenizer>(extra[file_name]);
  }
  TextEncoder t{b.module, tokenizer, b.info.extra.value("context_length", int64_t{77}),
                b.info.feature_dim, b.info.extra.value("logit_scale", 100.0), path};
  t.module.eval();
  return t;
}

const std::vector<std::string>& default_templates() {
  static const std::vector<std::string> templates = {"a photo of a {}.", "a photo of the {}.", "a close-up photo of a {}.",
                                                     "a good photo of a {}.", "a photo of my {}."};
  return templates;
}

std::map<std::string, std::vector<std::string>> class_prompt_names(const std::vector<std::string>& classes,
                                                                   const fs::path& names_file) {
  std::map<std::string, std::vector<std::string>> out;
  json j = json::object();
  if (!names_file.empty()) {
    try {
      j = json::parse(read_file(names_file));
    } catch (const json::exception& e) {
      throw InputError(names_file.string() + ": not valid JSON (" + e.what() + ")");
    }
    if (!j.is_object()) throw InputError(names_file.string() + ": expected {\"folder name\": \"prompt name\", ...}");
  }
  for (const auto& c : classes) {
    std::vector<std::string> names;
    if (j.contains(c)) {
      const json& v = j[c];
      if (v.is_string()) names.push_back(v.get<std::string>());
      else if (v.is_array() && !v.empty() && std::all_of(v.begin(), v.end(), [](const json& e) { return e.is_string(); }))
        names = v.get<std::vector<std::string>>();
      else throw InputError(names_file.string() + ": the names of \"" + c + "\" must be a string or a list of strings");
    } else {
      std::string name = c;
      std::replace(name.begin(), name.end(), '_', ' ');
      names.push_back(name);
    }
    out[c] = names;
  }
  return out;
}

std::vector<std::string> fill_templates(const std::vector<std::string>& names, const std::vector<std::string>& templates) {
  std::vector<std::string> prompts;
  for (const auto& name : names)
    for (const auto& t : templates) {
      const size_t at_brace = t.find("{}");
      prompts.push_back(at_brace == std::string::npos ? t + " " + name : t.substr(0, at_brace) + name + t.substr(at_brace + 2));
    }
  return prompts;
}

std::pair<at::Tensor, at::Tensor> zero_shot_head(TextEncoder& text, const std::vector<std::string>& classes,
                                                 const std::map<std::string, std::vector<std::string>>& names,
                                                 const std::vector<std::string>& templates) {
  at::NoGradGuard no_grad;
  std::vector<at::Tensor> rows;
  for (const auto& c : classes) {
    const at::Tensor tokens = text.tokenizer->tokenize(fill_templates(names.at(c), templates), text.context_length)
                                  .to(text.device);
    at::Tensor emb = text.module.forward({tokens}).toTensor().to(at::kCPU, at::kFloat);
    emb = emb / emb.norm(2, -1, true);
    at::Tensor mean = emb.mean(0);
    rows.push_back(mean / mean.norm());
  }
  return {at::stack(rows) * text.logit_scale, at::zeros({static_cast<int64_t>(classes.size())})};
}

void apply_zero_shot_head(Model& model, const std::vector<std::string>& classes, const std::string& text_model,
                          const std::string& class_names, const std::vector<std::string>& templates) {
  // The model's own text tower when it has one (adapted by contrastive training), else the one named.
  TextEncoder text = model.has_text_tower() ? text_encoder_of(model.text_bundle())
                                            : load_text_encoder(text_model.empty() ? text_model_for(model.bundle())
                                                                                   : fs::path(text_model));
  text.device = model.device();
  const fs::path& text_path = text.path;
  if (text.embed_dim != model.bundle().info.feature_dim)
    throw InputError(text_path.string() + " gives " + std::to_string(text.embed_dim) + "-d embeddings, but " +
                     model.bundle().path.string() + " gives " + std::to_string(model.bundle().info.feature_dim) + "-d ones");
  const auto names = class_prompt_names(classes, class_names);
  auto [weight, bias] = zero_shot_head(text, classes, names, templates.empty() ? default_templates() : templates);
  model.head().set(weight, bias);
  model.head().set_normalize_features(true);
  spdlog::info("zero-shot head from {} ({} classes, logit scale {})", text_path.string(), classes.size(), text.logit_scale);
}

ZeroShotHeadInit zero_shot_head_initializer() {
  return [](Model& model, const std::vector<std::string>& classes, const HeadConfig& head) {
    apply_zero_shot_head(model, classes, head.text_model, head.class_names, head.templates);
  };
}

ClassPromptMaker class_prompt_maker() {
  return [](const Model& model, const std::vector<std::string>& classes, const HeadConfig& head) {
    if (!model.has_text_tower()) throw RuntimeFailure("internal: class prompts without a text tower");
    const TextEncoder text = text_encoder_of(model.text_bundle());
    const auto names = class_prompt_names(classes, head.class_names);
    const auto& templates = head.templates.empty() ? default_templates() : head.templates;
    ClassPrompts out;
    json names_record = json::object();
    for (const auto& c : classes) {
      out.tokens.push_back(text.tokenizer->tokenize(fill_templates(names.at(c), templates), text.context_length));
      names_record[c] = names.at(c);
    }
    out.record = {{"templates", templates}, {"names", names_record}};
    return out;
  };
}

TokenizedTexts tokenize_texts(const TextEncoder& text, const std::vector<std::string>& texts) {
  TokenizedTexts out;
  out.tokens = text.tokenizer->tokenize(texts, text.context_length);
  // A text that was cut differs from its tokens in a longer context within the first `context` positions (the end
  // token took the last place); one that fits gives the same row.
  const at::Tensor longer = text.tokenizer->tokenize(texts, 4 * text.context_length).narrow(1, 0, text.context_length);
  out.truncated = out.tokens.ne(longer).any(1).sum().item<int64_t>();
  return out;
}

TextTokenizerFor text_tokenizer_for() {
  return [](const Model& model, const std::vector<std::string>& texts) {
    if (!model.has_text_tower()) throw RuntimeFailure("internal: captions without a text tower");
    return tokenize_texts(text_encoder_of(model.text_bundle()), texts);
  };
}

std::function<std::pair<at::Tensor, at::Tensor>(const fs::path&, const json&, const std::vector<std::string>&)>
prompt_head_maker() {
  return [](const fs::path& text_model, const json& prompts, const std::vector<std::string>& classes) {
    std::map<std::string, std::vector<std::string>> names;
    std::vector<std::string> templates;
    try {
      templates = prompts.at("templates").get<std::vector<std::string>>();
      for (const auto& c : classes) names[c] = prompts.at("names").at(c).get<std::vector<std::string>>();
    } catch (const json::exception& e) {
      throw InputError("the adapter's recorded class prompts are damaged (" + std::string(e.what()) + ")");
    }
    TextEncoder text = load_text_encoder(text_model);
    return zero_shot_head(text, classes, names, templates);
  };
}

}  // namespace loratune
