// Zero-shot classification with a CLIP text encoder: class names -> prompts -> text embeddings -> a head that
// scores images by cosine similarity (logit_scale * norm(image) . norm(text)). The same head can start training.
#pragma once

#include <torch/script.h>

#include <nlohmann/json.hpp>

#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "loratune/bundle.h"
#include "loratune/clip_tokenizer.h"
#include "loratune/model.h"
#include "loratune/training_setup.h"

namespace loratune {

struct TextEncoder {
  torch::jit::Module module;  // tokens [N, context] int64 -> embeddings [N, D]
  std::shared_ptr<const TextTokenizer> tokenizer;  // CLIP's BPE or SentencePiece (SigLIP)
  int64_t context_length = 77;
  int64_t embed_dim = 0;
  double logit_scale = 100.0;
  std::filesystem::path path;
  c10::Device device{c10::kCPU};  // where `module` is: tokens go there
};

// Loads a text-encoder bundle (kind "text_encoder") with its tokenizer file inside it (a CLIP checkpoint folder: its
// text tower).
TextEncoder load_text_encoder(const std::filesystem::path& path);

// The text encoder of a loaded text bundle (sharing its module: adapters on it apply).
TextEncoder text_encoder_of(const Bundle& text_bundle);

// Prompt templates ("{}" is replaced by a class name).
const std::vector<std::string>& default_templates();

// Names per class: from a JSON file {"folder name": "name" or ["name", ...]}; classes it does not list use their
// folder name (underscores as spaces).
std::map<std::string, std::vector<std::string>> class_prompt_names(const std::vector<std::string>& classes,
                                                                   const std::filesystem::path& names_file);

// Each name in each template ("{}" replaced; a template without one gets the name appended).
std::vector<std::string> fill_templates(const std::vector<std::string>& names, const std::vector<std::string>& templates);

// The zero-shot head: weight [C, D] = logit_scale * normalise(mean over names x templates of normalise(text)),
// bias 0. Use it on L2-normalised image features.
std::pair<at::Tensor, at::Tensor> zero_shot_head(TextEncoder& text, const std::vector<std::string>& classes,
                                                 const std::map<std::string, std::vector<std::string>>& names,
                                                 const std::vector<std::string>& templates);

// Sets `model`'s head to the zero-shot classifier of `classes` (a cosine classifier: features are normalised):
// text encoder `text_model` (empty: the one the image bundle names), prompt names from `class_names` (a JSON file;
// empty: the folder names), `templates` (empty: the defaults).
void apply_zero_shot_head(Model& model, const std::vector<std::string>& classes, const std::string& text_model,
                          const std::string& class_names, const std::vector<std::string>& templates);

// head.init zero_shot for build_training_model / prepare_training; with a model that has its text tower (loss
// contrastive) the head comes from that tower, adapters included.
ZeroShotHeadInit zero_shot_head_initializer();
// MergeOptions::text_head: the head from a (merged) text tower file and an adapter's recorded prompts.
std::function<std::pair<at::Tensor, at::Tensor>(const std::filesystem::path&, const nlohmann::json&,
                                                const std::vector<std::string>&)>
prompt_head_maker();
// The class prompts of loss contrastive (TrainingRunOptions::class_prompts, TrainerHooks::class_prompts).
ClassPromptMaker class_prompt_maker();
// The tokenizer of a model's text tower (TrainingRunOptions::tokenize, TrainerHooks::tokenize): texts cut to its
// context, counted.
TextTokenizerFor text_tokenizer_for();
// Texts as `text`'s tokens; `truncated`: how many were longer than its context.
TokenizedTexts tokenize_texts(const TextEncoder& text, const std::vector<std::string>& texts);

}  // namespace loratune
