#include "loratune/config.h"

#include <functional>
#include <map>
#include <sstream>
#include <type_traits>

#include "common/files.h"
#include "common/strings.h"
#include "common/value_rules.h"
#include "lora/lora_rules.h"
#include "loratune/adapter_init.h"
#include "loratune/adapter_variant.h"
#include "loratune/amp.h"
#include "loratune/captions.h"
#include "loratune/errors.h"
#include "loratune/threads.h"

using nlohmann::json;

namespace loratune {
namespace {

enum class Kind { kString, kPath, kInt, kIntOrAuto, kNumber, kBool, kStringList, kNumberPair, kIntMap, kNumberMap };

using Setter = std::function<void(TrainConfig&, const json&)>;
using Getter = std::function<json(const TrainConfig&)>;

// Where a key lands in the struct, both ways.
struct Binding {
  Setter set;  // puts the (checked) JSON value into the struct
  Getter get;  // the struct's value as JSON (before the key's null rule)
};

struct Key {
  Key(const char* path, Kind kind, bool nullable, bool changes_results, std::string help, Binding binding,
      Range range = Range::any(), std::vector<std::string> choices = {})
      : path(path), kind(kind), nullable(nullable), changes_results(changes_results), help(std::move(help)),
        binding(std::move(binding)), range(range), choices(std::move(choices)) {}

  const char* path;
  Kind kind;
  bool nullable;         // null means "not set": "" for strings, a negative number otherwise
  bool changes_results;  // false: where and how visibly it runs (a resumed run may change these)
  std::string help;
  Binding binding;
  Range range;                       // numbers: the value (each element of a pair, each value of a map)
  std::vector<std::string> choices;  // strings: the values allowed; empty: any

  void set(TrainConfig& c, const json& v) const { binding.set(c, v); }
  // The struct's value; null where a nullable key holds its "not set" value.
  json get(const TrainConfig& c) const {
    json v = binding.get(c);
    if (nullable && ((v.is_string() && v.get<std::string>().empty()) || (v.is_number() && v.get<double>() < 0)))
      return nullptr;
    return v;
  }
};

constexpr bool kResult = true, kNotResult = false;

// JSON value -> struct member; null means "empty" / "not set".
void assign(std::string& out, const json& v) { out = v.is_null() ? "" : v.get<std::string>(); }
void assign(int& out, const json& v) { out = v.get<int>(); }
void assign(int64_t& out, const json& v) { out = v.is_null() ? -1 : v.get<int64_t>(); }
void assign(uint64_t& out, const json& v) { out = v.get<uint64_t>(); }
void assign(double& out, const json& v) { out = v.is_null() ? -1.0 : v.get<double>(); }
void assign(bool& out, const json& v) { out = v.get<bool>(); }
template <typename E>
std::enable_if_t<std::is_enum_v<E>> assign(E& out, const json& v) { out = parse_enum<E>(v.get<std::string>(), "value"); }
template <typename T>
void assign(std::vector<T>& out, const json& v) { out = v.get<std::vector<T>>(); }
template <typename T>
void assign(std::map<std::string, T>& out, const json& v) { out = v.get<std::map<std::string, T>>(); }

// Struct member -> JSON value.
template <typename T>
json value_of(const T& member) {
  if constexpr (std::is_enum_v<T>) return enum_name(member);
  else return member;
}

// Where a key lands: a chain of members, e.g. field(&TrainConfig::optim, &OptimConfig::lr).
template <typename... Members>
Binding field(Members... members) {
  return {[=](TrainConfig& c, const json& v) { assign((c .* ... .* members), v); },
          [=](const TrainConfig& c) { return value_of((c .* ... .* members)); }};
}
// A path: "~" is the home folder.
template <typename... Members>
Binding path_field(Members... members) {
  return {[=](TrainConfig& c, const json& v) { (c .* ... .* members) = v.is_null() ? "" : expand_home(v.get<std::string>()); },
          [=](const TrainConfig& c) { return json((c .* ... .* members)); }};
}
// [a, b] from two members.
template <typename Section, typename... Members>
Binding pair_field(double Section::*first, double Section::*second, Members... section) {
  return {[=](TrainConfig& c, const json& v) {
            auto& s = (c .* ... .* section);
            s.*first = v[0], s.*second = v[1];
          },
          [=](const TrainConfig& c) {
            const auto& s = (c .* ... .* section);
            return json::array({s.*first, s.*second});
          }};
}

// lora.variant's help, from the registry: each variant and what it is.
std::string variants_help() {
  std::vector<std::string> parts;
  for (const auto* v : adapter_variants()) parts.push_back(v->name() + ": " + v->summary());
  return "adapter kind; " + join(parts, "; ");
}

// lora.init's help, from the registry.
std::string inits_help() {
  std::vector<std::string> parts;
  for (const auto* i : adapter_inits()) parts.push_back(i->name() + ": " + i->summary());
  return "how A and B start; " + join(parts, "; ");
}

// The schema: every key, its type, meaning and place (its default: the member's initial value in the structs).
// Nothing else is accepted.
const std::vector<Key>& schema() {
  using C = TrainConfig;
  using D = DataConfig;
  using A = AugmentConfig;
  using L = LoraSettings;
  using P = PromptSettings;
  using AF = AdaptFormerSettings;
  using H = HeadConfig;
  using O = OptimConfig;
  using S = ScheduleConfig;
  using LS = LossScaleConfig;
  static const std::vector<Key> keys = {
      {"model", Kind::kPath, false, kResult, "a bundle (.pt), a checkpoint folder (transformers, timm, open_clip) or hf:ORG/NAME from the hub cache", path_field(&C::model)},
      {"data.train", Kind::kPath, false, kResult, "photo folder: one subfolder per class, images in any depth below",
       path_field(&C::data, &D::train)},
      {"data.val", Kind::kPath, true, kResult, "held-out folder with the same classes; null: split data.train",
       path_field(&C::data, &D::val)},
      {"data.val_fraction", Kind::kNumber, false, kResult, "fraction of each class held out when data.val is null",
       field(&C::data, &D::val_fraction), Range::between(0, 1, true, true)},
      {"data.split_seed", Kind::kInt, false, kResult, "seed of that split", field(&C::data, &D::split_seed), Range::at_least(0)},
      {"data.workers", Kind::kInt, false, kNotResult, "decoding threads; 0: one per CPU core", field(&C::data, &D::workers), Range::at_least(0)},
      {"data.prefetch_batches", Kind::kInt, false, kNotResult, "batches decoded ahead of training",
       field(&C::data, &D::prefetch_batches), Range::at_least(1)},
      {"data.cache", Kind::kString, false, kNotResult,
       "keep decoded, resized images in memory (auto: if they fit in 2 GB)", field(&C::data, &D::cache), Range::any(), enum_names<CacheMode>()},
      {"data.prefix_cache", Kind::kString, false, kNotResult,
       "keep the output of the frozen prefix (stem and blocks without adapters; whole backbone for linear_probe) per "
       "image and reuse it in later epochs; valid only without augmentation (auto: on when augmentation is off and a "
       "block or more is frozen)",
       field(&C::data, &D::prefix_cache), Range::any(), enum_names<CacheMode>()},
      {"data.max_image_pixels", Kind::kInt, false, kResult,
       "skip (and list) images with more pixels than this, before decoding them; 0: no limit",
       field(&C::data, &D::max_image_pixels), Range::at_least(0)},
      {"data.augment.enabled", Kind::kBool, false, kResult, "training augmentation on/off",
       field(&C::data, &D::augment, &A::enabled)},
      {"data.augment.scale", Kind::kNumberPair, false, kResult,
       "random resized crop: area fraction range", pair_field(&A::scale_min, &A::scale_max, &C::data, &D::augment), Range::between(0, 1, true, false)},
      {"data.augment.ratio", Kind::kNumberPair, false, kResult,
       "random resized crop: aspect ratio range", pair_field(&A::ratio_min, &A::ratio_max, &C::data, &D::augment), Range::positive()},
      {"data.augment.hflip", Kind::kBool, false, kResult, "random horizontal flip",
       field(&C::data, &D::augment, &A::hflip)},
      {"data.captions", Kind::kPath, true, kResult,
       "loss contrastive: a caption file (metadata.jsonl or metadata.csv as Hugging Face imagefolder has them, or a "
       "CSV/TSV of path and caption; paths relative to the file's folder); each photo of data.train pairs with its "
       "caption (one of several, drawn per epoch) instead of a class prompt, photos without one are skipped and "
       "listed; null: class prompts",
       path_field(&C::data, &D::captions)},
      {"data.caption_column", Kind::kString, true, kResult,
       "the caption file's text column; null: the first of " + join(caption_columns(), ", ") + " it has",
       field(&C::data, &D::caption_column)},
      {"method", Kind::kString, false, kResult, "what trains: adapters on a frozen base (lora), every weight (full), the head alone (linear_probe), prompt tokens before the blocks (vpt) or bottleneck adapters beside the blocks' MLPs (adaptformer)", field(&C::method), Range::any(), method_names()},
      {"lora.rank", Kind::kInt, false, kResult, "adapter rank r", field(&C::lora, &L::rank), lora_rules::kRank},
      {"lora.alpha", Kind::kNumber, false, kResult, "scale s = alpha / r (alpha / sqrt(r) with rslora)",
       field(&C::lora, &L::alpha), lora_rules::kAlpha},
      {"lora.dropout", Kind::kNumber, false, kResult, "dropout on the adapter input", field(&C::lora, &L::dropout), lora_rules::kDropout},
      {"lora.rslora", Kind::kBool, false, kResult, "rank-stabilised scaling alpha / sqrt(r)",
       field(&C::lora, &L::rslora)},
      {"lora.variant", Kind::kString, false, kResult,
       variants_help(),
       field(&C::lora, &L::variant), Range::any(), variant_names()},
      {"lora.init", Kind::kString, false, kResult, inits_help(), field(&C::lora, &L::init), Range::any(),
       adapter_init_names()},
      {"lora.targets", Kind::kStringList, false, kResult,
       "module name suffixes or re:<regex>, with :q,v for slices of fused qkv, or all-linear (every Linear in the "
       "blocks); []: query and value of every block",
       field(&C::lora, &L::targets)},
      {"lora.text_targets", Kind::kStringList, false, kResult,
       "loss contrastive: the text tower's targets, as lora.targets; []: query and value of every block",
       field(&C::lora, &L::text_targets)},
      {"lora.last_blocks", Kind::kInt, true, kResult,
       "adapt only the last N transformer blocks (no backward through the blocks before them); null: all",
       field(&C::lora, &L::last_blocks), lora_rules::kLastBlocks},
      {"lora.rank_pattern", Kind::kIntMap, false, kResult, "pattern -> rank overrides",
       field(&C::lora, &L::rank_pattern), lora_rules::kRank},
      {"lora.alpha_pattern", Kind::kNumberMap, false, kResult, "pattern -> alpha overrides",
       field(&C::lora, &L::alpha_pattern), lora_rules::kAlpha},
      {"vpt.tokens", Kind::kInt, false, kResult, "method vpt: prompt tokens per set", field(&C::vpt, &P::tokens),
       Range::at_least(1)},
      {"vpt.deep", Kind::kBool, false, kResult,
       "method vpt: a set of prompts before every block (VPT-deep); false: one set before the first block (VPT-shallow)",
       field(&C::vpt, &P::deep)},
      {"adaptformer.bottleneck", Kind::kInt, false, kResult, "method adaptformer: the adapters' inner width",
       field(&C::adaptformer, &AF::bottleneck), Range::at_least(1)},
      {"adaptformer.scale", Kind::kNumber, false, kResult, "method adaptformer: the adapters' output scale s",
       field(&C::adaptformer, &AF::scale), Range::positive()},
      {"adaptformer.sequential", Kind::kBool, false, kResult,
       "method adaptformer: the adapter reads the MLP's output (AdaptFormer's sequential form); false: the MLP's input "
       "before its LayerNorm, beside the MLP (parallel)",
       field(&C::adaptformer, &AF::sequential)},
      {"head.init", Kind::kString, false, kResult,
       "how the head starts; zero_shot: from the text encoder's class embeddings (cosine classifier, CLIP models)",
       field(&C::head, &H::init), Range::any(), enum_names<HeadInit>()},
      {"head.text_model", Kind::kPath, true, kResult,
       "zero_shot: text encoder bundle; null: the one the model names", path_field(&C::head, &H::text_model)},
      {"head.class_names", Kind::kPath, true, kResult, "zero_shot: JSON file {\"folder\": \"name\" or [names]}",
       path_field(&C::head, &H::class_names)},
      {"head.templates", Kind::kStringList, false, kResult,
       "zero_shot: prompt templates with {}; []: defaults", field(&C::head, &H::templates)},
      {"optim.lr", Kind::kNumber, false, kResult, "peak learning rate (AdamW)", field(&C::optim, &O::lr), Range::positive()},
      {"optim.head_lr", Kind::kNumber, true, kResult, "learning rate of the classification head; null: optim.lr",
       field(&C::optim, &O::head_lr), Range::positive()},
      {"optim.weight_decay", Kind::kNumber, false, kResult, "decoupled weight decay on matrices",
       field(&C::optim, &O::weight_decay), Range::at_least(0)},
      {"optim.betas", Kind::kNumberPair, false, kResult, "AdamW betas",
       pair_field(&O::beta1, &O::beta2, &C::optim), Range::between(0, 1, false, true)},
      {"optim.eps", Kind::kNumber, false, kResult, "AdamW epsilon (keeps its division finite)", field(&C::optim, &O::eps),
       Range::positive()},
      {"optim.grad_clip", Kind::kNumber, false, kResult, "clip the global gradient norm; 0: off",
       field(&C::optim, &O::grad_clip), Range::at_least(0)},
      {"optim.lora_plus_ratio", Kind::kNumber, true, kResult,
       "LoRA+: learning rate of the B matrices = this x optim.lr (PEFT's loraplus_lr_ratio; 16 is its suggestion); "
       "null: off",
       field(&C::optim, &O::lora_plus_ratio), Range::positive()},
      {"schedule.warmup_fraction", Kind::kNumber, false, kResult, "linear warm-up over this fraction of the steps",
       field(&C::schedule, &S::warmup_fraction), Range::between(0, 1, false, true)},
      {"schedule.min_lr_ratio", Kind::kNumber, false, kResult, "cosine decay ends at this fraction of the peak",
       field(&C::schedule, &S::min_lr_ratio), Range::between(0, 1, false, false)},
      {"batch_size", Kind::kInt, false, kResult, "images per micro-batch (what must fit in memory)",
       field(&C::batch_size), Range::between(1, 65536, false, false)},
      {"grad_accum_steps", Kind::kInt, false, kResult,
       "micro-batches per optimiser step: effective batch = batch_size x this", field(&C::grad_accum_steps),
       Range::between(1, 65536, false, false)},
      {"epochs", Kind::kInt, false, kResult, "passes over the training images", field(&C::epochs), Range::at_least(1)},
      {"max_steps", Kind::kInt, true, kResult, "stop after this many optimiser steps; null: from epochs",
       field(&C::max_steps), Range::at_least(1)},
      {"loss", Kind::kString, false, kResult,
       "cross_entropy: train the head on class labels; contrastive: CLIP's image-text loss on a class prompt per "
       "image (FLYP), LoRA on both towers, classes scored by the adapted text tower",
       field(&C::loss), Range::any(), enum_names<TrainingLoss>()},
      {"contrastive.negatives", Kind::kString, false, kResult,
       "loss contrastive: a pair's negatives are the other pairs of the whole optimiser step (batch_size x "
       "grad_accum_steps, embeddings cached: the memory of one micro-batch) or of its micro-batch only",
       field(&C::contrastive, &ContrastiveConfig::negatives), Range::any(), enum_names<ContrastiveNegatives>()},
      {"label_smoothing", Kind::kNumber, false, kResult, "cross-entropy label smoothing", field(&C::label_smoothing), Range::between(0, 1, false, true)},
      {"precision", Kind::kString, false, kResult,
       "compute precision (auto: bf16 on CUDA where supported, else fp16; fp32 on the CPU)", field(&C::precision), Range::any(), precision_choices()},
      {"frozen_dtype", Kind::kString, false, kResult,
       "storage of frozen base weights (auto: the compute dtype on CUDA with mixed precision; int8, nf4: the blocks' "
       "Linear weights quantised, the rest as auto)",
       field(&C::frozen_dtype), Range::any(), enum_names<FrozenStorage>()},
      {"gradient_checkpointing", Kind::kBool, false, kResult,
       "recompute each block in backward instead of storing activations", field(&C::gradient_checkpointing)},
      {"offload", Kind::kString, false, kNotResult,
       "CUDA: keep in pinned host memory, copied in one block ahead on a side stream: weights (the blocks' frozen "
       "weights, two blocks on the GPU at a time), activations (the inputs checkpointed blocks keep for backward), "
       "or both; on the CPU it does nothing",
       field(&C::offload), Range::any(), enum_names<OffloadMode>()},
      {"loss_scale.init", Kind::kNumber, false, kResult, "fp16: initial loss scale",
       field(&C::loss_scale, &LS::init), Range::positive()},
      {"loss_scale.growth_interval", Kind::kInt, false, kResult, "fp16: clean steps before the scale doubles",
       field(&C::loss_scale, &LS::growth_interval), Range::at_least(1)},
      {"early_stopping.patience", Kind::kInt, true, kResult,
       "stop when this many validations in a row bring no better top-1 (the best adapter is kept); null: off",
       field(&C::early_stopping, &EarlyStoppingConfig::patience), Range::at_least(1)},
      {"device", Kind::kString, false, kNotResult, "auto | cpu | cuda | cuda:N", field(&C::device)},
      {"threads", Kind::kIntOrAuto, false, kNotResult,
       "CPU threads for compute: auto follows the machine's load (fewer threads while other programs are busy); a "
       "number pins it (0: one per core; pin it for bit-identical reruns on any load)",
       {[](TrainConfig& c, const json& v) { c.threads = v.is_string() ? kAutoThreads : v.get<int>(); },
        [](const TrainConfig& c) { return c.threads == kAutoThreads ? json("auto") : json(c.threads); }},
       Range::between(0, 4096, false, false), {"auto"}},
      {"seed", Kind::kInt, false, kResult,
       "seed of adapter/head initialisation, shuffling, augmentation and dropout", field(&C::seed)},
      {"output_dir", Kind::kPath, false, kNotResult,
       "run folder: adapters, checkpoints, metrics, summary", path_field(&C::output_dir)},
      {"eval_every_epochs", Kind::kInt, false, kResult, "validate every N epochs (and at the end)",
       field(&C::eval_every_epochs), Range::at_least(1)},
      {"checkpoint_every_steps", Kind::kInt, false, kNotResult,
       "also checkpoint every N optimiser steps; 0: each epoch only", field(&C::checkpoint_every_steps), Range::at_least(0)},
      {"log_every_steps", Kind::kInt, false, kNotResult, "metrics.jsonl line every N optimiser steps",
       field(&C::log_every_steps), Range::at_least(1)},
  };
  return keys;
}

const char* kind_name(Kind k) {
  switch (k) {
    case Kind::kString: return "string";
    case Kind::kPath: return "string (a path; ~ is your home folder)";
    case Kind::kInt: return "integer";
    case Kind::kIntOrAuto: return "integer or \"auto\"";
    case Kind::kNumber: return "number";
    case Kind::kBool: return "boolean";
    case Kind::kStringList: return "array of strings";
    case Kind::kNumberPair: return "array of two numbers";
    case Kind::kIntMap: return "object of integers";
    case Kind::kNumberMap: return "object of numbers";
  }
  return "?";
}

std::string with_article(const std::string& noun) {
  return (std::string("aeiou").find(noun[0]) == std::string::npos ? "a " : "an ") + noun;
}

bool has_kind(const json& v, Kind k) {
  switch (k) {
    case Kind::kString:
    case Kind::kPath: return v.is_string();
    case Kind::kInt: return v.is_number_integer();
    case Kind::kIntOrAuto: return v.is_number_integer() || v == "auto";
    case Kind::kNumber: return v.is_number();
    case Kind::kBool: return v.is_boolean();
    case Kind::kStringList:
      return v.is_array() && std::all_of(v.begin(), v.end(), [](const json& e) { return e.is_string(); });
    case Kind::kNumberPair:
      return v.is_array() && v.size() == 2 && v[0].is_number() && v[1].is_number();
    case Kind::kIntMap:
      return v.is_object() && std::all_of(v.begin(), v.end(), [](const json& e) { return e.is_number_integer(); });
    case Kind::kNumberMap:
      return v.is_object() && std::all_of(v.begin(), v.end(), [](const json& e) { return e.is_number(); });
  }
  return false;
}

std::vector<std::string> split_path(const std::string& path) {
  std::vector<std::string> parts;
  std::stringstream ss(path);
  std::string part;
  while (std::getline(ss, part, '.')) parts.push_back(part);
  return parts;
}

json::json_pointer pointer(const std::string& path) {
  std::string p;
  for (const auto& part : split_path(path)) p += "/" + part;
  return json::json_pointer(p);
}

// Walks the user's document: every leaf must be a schema key (or inside a map-valued key).
void check_keys(const json& node, const std::string& prefix, const std::string& origin) {
  std::vector<std::string> all;
  for (const auto& k : schema()) all.push_back(k.path);
  for (const auto& [name, value] : node.items()) {
    const std::string path = prefix.empty() ? name : prefix + "." + name;
    const auto key = std::find_if(schema().begin(), schema().end(), [&](const Key& k) { return path == k.path; });
    if (key != schema().end()) continue;
    const bool is_section = std::any_of(schema().begin(), schema().end(), [&](const Key& k) {
      return std::string(k.path).rfind(path + ".", 0) == 0;
    });
    if (is_section && value.is_object()) {
      check_keys(value, path, origin);
      continue;
    }
    if (is_section) throw InputError(origin + ": " + path + " must be an object");
    std::vector<std::string> candidates = all;
    for (const auto& k : schema()) candidates.push_back(split_path(k.path).back());
    std::string close = nearest(path, all);
    if (close.empty()) {
      const std::string leaf = nearest(name, candidates);
      for (const auto& k : schema())
        if (!leaf.empty() && split_path(k.path).back() == leaf) close = k.path;
    }
    throw InputError(origin + ": unknown key \"" + path + "\"" + (close.empty() ? "" : " (did you mean \"" + close + "\"?)") +
                     "; `loratune train --help-config` lists every key");
  }
}

TrainConfig to_struct(const json& j, const std::string& origin) {
  TrainConfig c;
  for (const auto& k : schema()) {
    try {
      k.set(c, j.at(pointer(k.path)));
    } catch (const InputError& e) {
      throw InputError(origin + ": " + e.what());
    }
  }
  return c;
}

// A value of the user's against its key's range and choices (its kind is already checked).
void check_rules(const Key& k, const json& v, const std::string& origin) {
  auto fail = [&](const std::string& what) { throw InputError(origin + ": " + k.path + what); };
  if (!k.choices.empty() && v.is_string() &&
      std::find(k.choices.begin(), k.choices.end(), v.get<std::string>()) == k.choices.end())
    fail(" must be " + choices_text(k.choices) + " (got " + v.dump() + ")");
  if (!k.range.bounded()) return;
  if (v.is_number() && !k.range.contains(v.get<double>())) fail(" must be " + k.range.text() + " (got " + v.dump() + ")");
  if (v.is_array() || v.is_object())
    for (const auto& e : v)
      if (!k.range.contains(e.get<double>()))
        fail(std::string(v.is_array() ? " entries" : " values") + " must be " + k.range.text() + " (got " + e.dump() + ")");
}

// Rules between keys; each key's own range and choices are in its record.
void check_combinations(const TrainConfig& c, const std::string& origin) {
  auto fail = [&](const std::string& what) { throw InputError(origin + ": " + what); };
  if (c.model.empty())
    fail("\"model\" is required: a model bundle (.pt), a checkpoint folder or hf:ORG/NAME (`loratune import --help`)");
  if (c.data.train.empty()) fail("\"data.train\" is required: the photo folder to train on");
  if (c.data.prefix_cache == CacheMode::kMemory && c.data.augment.enabled)
    fail("data.prefix_cache memory needs data.augment.enabled false: augmented images differ every epoch, so their "
         "prefix outputs cannot be reused");
  for (const auto& t : c.head.templates)
    if (t.find("{}") == std::string::npos) fail("head.templates: \"" + t + "\" has no {} for the class name");
  const auto& a = c.data.augment;
  if (!(a.scale_min <= a.scale_max)) fail("data.augment.scale must be [min, max] with min <= max");
  if (!(a.ratio_min <= a.ratio_max)) fail("data.augment.ratio must be [min, max] with min <= max");
  if (c.optim.lora_plus_ratio > 0 && c.method != Method::kLora)
    fail("optim.lora_plus_ratio applies to method lora only (it sets the learning rate of the B matrices)");
  if (c.output_dir.empty()) fail("output_dir must not be empty");
  if ((c.frozen_dtype == FrozenStorage::kInt8 || c.frozen_dtype == FrozenStorage::kNf4) && !adapts_frozen_base(c.method))
    fail("frozen_dtype " + enum_name(c.frozen_dtype) + " quantises the frozen base under adapters or prompts: set "
         "method to lora, vpt or adaptformer");
  if (c.offload != OffloadMode::kNone && !adapts_frozen_base(c.method))
    fail("offload " + enum_name(c.offload) + " moves the frozen base under adapters or prompts: set method to lora, vpt or "
         "adaptformer");
  if (c.offload != OffloadMode::kNone && !c.gradient_checkpointing)
    fail("offload " + enum_name(c.offload) + " needs gradient_checkpointing true: without it backward keeps every block's "
         "weights and activations on the GPU");
  if (c.loss == TrainingLoss::kContrastive) {
    if (c.method != Method::kLora)
      fail("loss contrastive trains LoRA adapters on both towers (prompt tokens and AdaptFormer's adapters reach the "
           "image tower only): set method to lora");
    if (c.head.init != HeadInit::kZeroShot)
      fail("loss contrastive scores classes with the text tower: set head.init to zero_shot");
    if (c.label_smoothing > 0) fail("label_smoothing applies to loss cross_entropy; set it to 0");
    if (c.optim.head_lr > 0) fail("optim.head_lr: with loss contrastive the head is not trained (the text tower "
                                  "gives it); remove it");
  } else if (!c.data.captions.empty()) {
    fail("data.captions pairs photos with their captions for loss contrastive: set loss to contrastive, or remove it");
  }
}

}  // namespace

json result_settings(const json& resolved) {
  json record = resolved;
  for (const auto& k : schema()) {
    const auto ptr = pointer(k.path);
    if (!record.contains(ptr)) continue;
    if (!k.changes_results) record[ptr.parent_pointer()].erase(ptr.back());
    // A file or folder by its name alone: an adapter shared with others does not tell the owner's folders.
    else if (k.kind == Kind::kPath && record[ptr].is_string()) {
      std::filesystem::path path = std::filesystem::path(record[ptr].get<std::string>()).lexically_normal();
      if (path.filename().empty()) path = path.parent_path();  // "photos/train/"
      record[ptr] = path.filename().string();
    }
  }
  return record;
}

std::vector<std::string> changed_settings(const json& recorded, const json& now) {
  const json defaults = result_settings(default_config_json());
  std::vector<std::string> changed;
  for (const auto& k : schema()) {
    if (!k.changes_results) continue;
    const auto ptr = pointer(k.path);
    const json value = now.contains(ptr) ? now.at(ptr) : json();
    if (!recorded.contains(ptr)) {
      const json fallback = defaults.contains(ptr) ? defaults.at(ptr) : json();
      if (value != fallback)
        changed.push_back(std::string(k.path) + " (new since the run began; its default " + fallback.dump() +
                          " resumes it) vs " + value.dump());
    } else if (recorded.at(ptr) != value) {
      changed.push_back(std::string(k.path) + " " + recorded.at(ptr).dump() + " vs " + value.dump());
    }
  }
  return changed;
}

json default_config_json() { return config_json(TrainConfig{}); }

json config_json(const TrainConfig& config) {
  json j = json::object();
  for (const auto& k : schema()) j[pointer(k.path)] = k.get(config);
  return j;
}

void check_train_config(const TrainConfig& config) { parse_train_config(config_json(config), "configuration"); }

std::string config_reference() {
  std::string out;
  const TrainConfig defaults;
  for (const auto& k : schema()) {
    std::string line = std::string("  ") + k.path;
    line.resize(std::max<size_t>(line.size() + 1, 30), ' ');
    std::string type = std::string(kind_name(k.kind)) + (k.nullable ? " or null" : "");
    type.resize(std::max<size_t>(type.size() + 1, 26), ' ');
    out += line + type + "default " + k.get(defaults).dump() + "\n" + std::string(32, ' ') + k.help + "\n";
    if (!k.choices.empty()) out += std::string(32, ' ') + "one of: " + join(k.choices, " | ") + "\n";
    if (k.range.bounded())
      out += std::string(32, ' ') + "range: " +
             (k.kind == Kind::kNumber || k.kind == Kind::kInt || k.kind == Kind::kIntOrAuto ? "" : "each ") +
             k.range.text() + "\n";
  }
  return out;
}

TrainConfig parse_train_config(const json& user, const std::string& origin) {
  if (!user.is_object()) throw InputError(origin + ": the configuration must be a JSON object");
  check_keys(user, "", origin);
  json merged = default_config_json();
  for (const auto& k : schema()) {
    const auto ptr = pointer(k.path);
    if (!user.contains(ptr)) continue;
    const json& v = user.at(ptr);
    if (v.is_null() && k.nullable) {
      merged[ptr] = nullptr;
      continue;
    }
    if (!has_kind(v, k.kind))
      throw InputError(origin + ": " + k.path + " must be " + (k.nullable ? "null or " : "") + with_article(kind_name(k.kind)) +
                       ", not " + v.dump());
    check_rules(k, v, origin);
    merged[ptr] = v;
  }
  TrainConfig c = to_struct(merged, origin);
  check_combinations(c, origin);
  return c;
}

namespace {

// "key=value" overrides (as --set gives them) into a user document: a typo is the flag's fault, not the file's.
void apply_overrides(json& user, const std::vector<std::string>& overrides) {
  for (const auto& o : overrides) {
    const size_t eq = o.find('=');
    if (eq == std::string::npos || eq == 0) throw InputError("--set " + o + ": expected key=value, e.g. --set lora.rank=16");
    const std::string key = o.substr(0, eq), text = o.substr(eq + 1);
    json value;
    try {
      value = json::parse(text);
    } catch (const json::parse_error&) {
      value = text;  // a bare string
    }
    json alone = json::object();  // check the key on its own first
    try {
      alone[pointer(key)] = value;
      check_keys(alone, "", "--set " + o);
      user[pointer(key)] = value;
    } catch (const json::exception&) {
      throw InputError("--set " + o + ": " + key + " is not a key inside an object of the configuration");
    }
  }
}

}  // namespace

TrainConfig load_train_config(const std::filesystem::path& path, const std::vector<std::string>& overrides) {
  json user = json::object();
  std::string origin = "configuration";
  if (!path.empty()) {
    origin = path.string();
    try {
      user = json::parse(read_file(path), nullptr, true, /*ignore_comments=*/true);
    } catch (const json::parse_error& e) {
      throw InputError(origin + ": not valid JSON (" + std::string(e.what()) + ")");
    }
    if (!user.is_object()) throw InputError(origin + ": the configuration must be a JSON object");
  }
  apply_overrides(user, overrides);
  return parse_train_config(user, origin);
}

TrainConfig with_overrides(const TrainConfig& config, const std::vector<std::string>& overrides) {
  json document = config_json(config);
  apply_overrides(document, overrides);
  return parse_train_config(document, "configuration");
}

}  // namespace loratune
