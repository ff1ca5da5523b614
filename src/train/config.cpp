#include "loratune/config.h"

#include <sstream>

#include "loratune/errors.h"
#include "loratune/files.h"
#include "loratune/strings.h"

using nlohmann::json;

namespace loratune {
namespace {

enum class Kind { kString, kPath, kInt, kNumber, kBool, kStringList, kNumberPair, kIntMap, kNumberMap };

struct Key {
  const char* path;
  Kind kind;
  json fallback;
  bool nullable;
  const char* help;
};

// The schema: every key, its type, default and meaning. Nothing else is accepted.
const std::vector<Key>& schema() {
  static const std::vector<Key> keys = {
      {"model", Kind::kPath, "", false, "model bundle (.pt) made by scripts/export/*.py"},
      {"data.train", Kind::kPath, "", false, "photo folder: one subfolder per class, images in any depth below"},
      {"data.val", Kind::kPath, nullptr, true, "held-out folder with the same classes; null: split data.train"},
      {"data.val_fraction", Kind::kNumber, 0.1, false, "fraction of each class held out when data.val is null"},
      {"data.split_seed", Kind::kInt, 0, false, "seed of that split"},
      {"data.workers", Kind::kInt, 0, false, "decoding threads; 0: one per CPU core"},
      {"data.prefetch_batches", Kind::kInt, 4, false, "batches decoded ahead of training"},
      {"data.cache", Kind::kString, "auto", false, "keep decoded, resized images in memory: auto (if they fit in 2 GB) | memory | off"},
      {"data.prefix_cache", Kind::kString, "auto", false,
       "keep the output of the frozen prefix (stem and blocks without adapters; whole backbone for linear_probe) per "
       "image and reuse it in later epochs; valid only without augmentation: auto (on when augmentation is off and a "
       "block or more is frozen) | memory | off"},
      {"data.max_image_pixels", Kind::kInt, 100000000, false,
       "skip (and list) images with more pixels than this, before decoding them; 0: no limit"},
      {"data.augment.enabled", Kind::kBool, true, false, "training augmentation on/off"},
      {"data.augment.scale", Kind::kNumberPair, json::array({0.35, 1.0}), false, "random resized crop: area fraction range"},
      {"data.augment.ratio", Kind::kNumberPair, json::array({0.75, 4.0 / 3.0}), false, "random resized crop: aspect ratio range"},
      {"data.augment.hflip", Kind::kBool, true, false, "random horizontal flip"},
      {"method", Kind::kString, "lora", false, "lora | full | linear_probe"},
      {"lora.rank", Kind::kInt, 8, false, "adapter rank r"},
      {"lora.alpha", Kind::kNumber, 16.0, false, "scale s = alpha / r (alpha / sqrt(r) with rslora)"},
      {"lora.dropout", Kind::kNumber, 0.1, false, "dropout on the adapter input"},
      {"lora.rslora", Kind::kBool, false, false, "rank-stabilised scaling alpha / sqrt(r)"},
      {"lora.targets", Kind::kStringList, json::array(), false,
       "module name suffixes or re:<regex>, with :q,v for slices of fused qkv; []: query and value of every block"},
      {"lora.rank_pattern", Kind::kIntMap, json::object(), false, "pattern -> rank overrides"},
      {"lora.alpha_pattern", Kind::kNumberMap, json::object(), false, "pattern -> alpha overrides"},
      {"head.init", Kind::kString, "random", false,
       "random | zero_shot: start from the text encoder's class embeddings (cosine classifier, CLIP models)"},
      {"head.text_model", Kind::kPath, nullptr, true, "zero_shot: text encoder bundle; null: the one the model names"},
      {"head.class_names", Kind::kPath, nullptr, true, "zero_shot: JSON file {\"folder\": \"name\" or [names]}"},
      {"head.templates", Kind::kStringList, json::array(), false, "zero_shot: prompt templates with {}; []: defaults"},
      {"optim.lr", Kind::kNumber, 1e-3, false, "peak learning rate (AdamW)"},
      {"optim.head_lr", Kind::kNumber, nullptr, true, "learning rate of the classification head; null: optim.lr"},
      {"optim.weight_decay", Kind::kNumber, 0.01, false, "decoupled weight decay on matrices"},
      {"optim.betas", Kind::kNumberPair, json::array({0.9, 0.999}), false, "AdamW betas"},
      {"optim.eps", Kind::kNumber, 1e-8, false, "AdamW epsilon"},
      {"optim.grad_clip", Kind::kNumber, 1.0, false, "clip the global gradient norm; 0: off"},
      {"schedule.warmup_fraction", Kind::kNumber, 0.05, false, "linear warm-up over this fraction of the steps"},
      {"schedule.min_lr_ratio", Kind::kNumber, 0.0, false, "cosine decay ends at this fraction of the peak"},
      {"batch_size", Kind::kInt, 16, false, "images per micro-batch (what must fit in memory)"},
      {"grad_accum_steps", Kind::kInt, 1, false, "micro-batches per optimiser step: effective batch = batch_size x this"},
      {"epochs", Kind::kInt, 10, false, "passes over the training images"},
      {"max_steps", Kind::kInt, nullptr, true, "stop after this many optimiser steps; null: from epochs"},
      {"label_smoothing", Kind::kNumber, 0.0, false, "cross-entropy label smoothing"},
      {"precision", Kind::kString, "auto", false, "auto (CUDA: bf16 if supported else fp16; CPU: fp32) | fp32 | bf16 | fp16"},
      {"frozen_dtype", Kind::kString, "auto", false,
       "storage of frozen base weights: auto (compute dtype on CUDA with mixed precision) | fp32 | compute"},
      {"gradient_checkpointing", Kind::kBool, true, false, "recompute each block in backward instead of storing activations"},
      {"loss_scale.init", Kind::kNumber, 65536.0, false, "fp16: initial loss scale"},
      {"loss_scale.growth_interval", Kind::kInt, 2000, false, "fp16: clean steps before the scale doubles"},
      {"device", Kind::kString, "auto", false, "auto | cpu | cuda | cuda:N"},
      {"threads", Kind::kInt, 0, false, "CPU threads for compute; 0: all cores"},
      {"seed", Kind::kInt, 0, false, "seed of adapter/head initialisation, shuffling, augmentation and dropout"},
      {"output_dir", Kind::kPath, "runs/default", false, "run folder: adapters, checkpoints, metrics, summary"},
      {"eval_every_epochs", Kind::kInt, 1, false, "validate every N epochs (and at the end)"},
      {"checkpoint_every_steps", Kind::kInt, 0, false, "also checkpoint every N optimiser steps; 0: each epoch only"},
      {"log_every_steps", Kind::kInt, 10, false, "metrics.jsonl line every N optimiser steps"},
  };
  return keys;
}

const char* kind_name(Kind k) {
  switch (k) {
    case Kind::kString: return "string";
    case Kind::kPath: return "string (a path; ~ is your home folder)";
    case Kind::kInt: return "integer";
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

TrainConfig to_struct(const json& j) {
  auto at = [&](const char* path) -> const json& { return j.at(pointer(path)); };
  auto path_at = [&](const char* path) -> std::string { return at(path).is_null() ? "" : expand_home(at(path).get<std::string>()); };
  TrainConfig c;
  c.model = path_at("model");
  c.data.train = path_at("data.train");
  c.data.val = path_at("data.val");
  c.data.val_fraction = at("data.val_fraction");
  c.data.split_seed = at("data.split_seed");
  c.data.workers = at("data.workers");
  c.data.prefetch_batches = at("data.prefetch_batches");
  c.data.cache = at("data.cache");
  c.data.prefix_cache = at("data.prefix_cache");
  c.data.max_image_pixels = at("data.max_image_pixels");
  c.data.augment.enabled = at("data.augment.enabled");
  c.data.augment.scale_min = at("data.augment.scale")[0];
  c.data.augment.scale_max = at("data.augment.scale")[1];
  c.data.augment.ratio_min = at("data.augment.ratio")[0];
  c.data.augment.ratio_max = at("data.augment.ratio")[1];
  c.data.augment.hflip = at("data.augment.hflip");
  c.method = at("method");
  c.lora.rank = at("lora.rank");
  c.lora.alpha = at("lora.alpha");
  c.lora.dropout = at("lora.dropout");
  c.lora.rslora = at("lora.rslora");
  c.lora.targets = at("lora.targets").get<std::vector<std::string>>();
  c.lora.rank_pattern = at("lora.rank_pattern").get<std::map<std::string, int64_t>>();
  c.lora.alpha_pattern = at("lora.alpha_pattern").get<std::map<std::string, double>>();
  c.head_init = at("head.init");
  c.text_model = path_at("head.text_model");
  c.class_names = path_at("head.class_names");
  c.templates = at("head.templates").get<std::vector<std::string>>();
  c.lr = at("optim.lr");
  c.head_lr = at("optim.head_lr").is_null() ? -1.0 : at("optim.head_lr").get<double>();
  c.weight_decay = at("optim.weight_decay");
  c.beta1 = at("optim.betas")[0];
  c.beta2 = at("optim.betas")[1];
  c.eps = at("optim.eps");
  c.grad_clip = at("optim.grad_clip");
  c.warmup_fraction = at("schedule.warmup_fraction");
  c.min_lr_ratio = at("schedule.min_lr_ratio");
  c.batch_size = at("batch_size");
  c.grad_accum_steps = at("grad_accum_steps");
  c.epochs = at("epochs");
  c.max_steps = at("max_steps").is_null() ? -1 : at("max_steps").get<int64_t>();
  c.label_smoothing = at("label_smoothing");
  c.precision = at("precision");
  c.frozen_dtype = at("frozen_dtype");
  c.gradient_checkpointing = at("gradient_checkpointing");
  c.loss_scale_init = at("loss_scale.init");
  c.loss_scale_growth_interval = at("loss_scale.growth_interval");
  c.device = at("device");
  c.threads = at("threads");
  c.seed = at("seed");
  c.output_dir = path_at("output_dir");
  c.eval_every_epochs = at("eval_every_epochs");
  c.checkpoint_every_steps = at("checkpoint_every_steps");
  c.log_every_steps = at("log_every_steps");
  c.json = j;
  return c;
}

void check_values(const TrainConfig& c, const std::string& origin) {
  auto fail = [&](const std::string& what) { throw InputError(origin + ": " + what); };
  if (c.model.empty()) fail("\"model\" is required: the model bundle to adapt (make one with scripts/export/)");
  if (c.data.train.empty()) fail("\"data.train\" is required: the photo folder to train on");
  if (c.data.val.empty() && !(c.data.val_fraction > 0 && c.data.val_fraction < 1))
    fail("data.val_fraction must be between 0 and 1 (exclusive) when data.val is null");
  if (c.data.workers < 0 || c.data.prefetch_batches < 1) fail("data.workers must be >= 0 and data.prefetch_batches >= 1");
  if (c.data.cache != "auto" && c.data.cache != "memory" && c.data.cache != "off") fail("data.cache must be auto, memory or off");
  if (c.data.prefix_cache != "auto" && c.data.prefix_cache != "memory" && c.data.prefix_cache != "off")
    fail("data.prefix_cache must be auto, memory or off");
  if (c.data.prefix_cache == "memory" && c.data.augment.enabled)
    fail("data.prefix_cache memory needs data.augment.enabled false: augmented images differ every epoch, so their "
         "prefix outputs cannot be reused");
  if (c.head_init != "random" && c.head_init != "zero_shot") fail("head.init must be random or zero_shot");
  for (const auto& t : c.templates)
    if (t.find("{}") == std::string::npos) fail("head.templates: \"" + t + "\" has no {} for the class name");
  const auto& a = c.data.augment;
  if (!(0 < a.scale_min && a.scale_min <= a.scale_max && a.scale_max <= 1)) fail("data.augment.scale must be [min, max] with 0 < min <= max <= 1");
  if (!(0 < a.ratio_min && a.ratio_min <= a.ratio_max)) fail("data.augment.ratio must be [min, max] with 0 < min <= max");
  if (c.method != "lora" && c.method != "full" && c.method != "linear_probe") fail("method must be lora, full or linear_probe (got \"" + c.method + "\")");
  if (c.lora.rank <= 0) fail("lora.rank must be a positive integer");
  if (!(c.lora.alpha > 0)) fail("lora.alpha must be positive");
  if (c.lora.dropout < 0 || c.lora.dropout >= 1) fail("lora.dropout must be in [0, 1)");
  if (!(c.lr > 0)) fail("optim.lr must be positive");
  if (c.weight_decay < 0 || c.grad_clip < 0) fail("optim.weight_decay and optim.grad_clip must be >= 0");
  if (!(c.beta1 >= 0 && c.beta1 < 1 && c.beta2 >= 0 && c.beta2 < 1)) fail("optim.betas must be in [0, 1)");
  if (c.warmup_fraction < 0 || c.warmup_fraction >= 1) fail("schedule.warmup_fraction must be in [0, 1)");
  if (c.min_lr_ratio < 0 || c.min_lr_ratio > 1) fail("schedule.min_lr_ratio must be in [0, 1]");
  if (c.batch_size < 1 || c.grad_accum_steps < 1) fail("batch_size and grad_accum_steps must be >= 1");
  if (c.epochs < 1) fail("epochs must be >= 1");
  if (c.label_smoothing < 0 || c.label_smoothing >= 1) fail("label_smoothing must be in [0, 1)");
  if (c.frozen_dtype != "auto" && c.frozen_dtype != "fp32" && c.frozen_dtype != "compute") fail("frozen_dtype must be auto, fp32 or compute");
  if (c.threads < 0) fail("threads must be >= 0");
  if (c.eval_every_epochs < 1 || c.checkpoint_every_steps < 0 || c.log_every_steps < 1)
    fail("eval_every_epochs and log_every_steps must be >= 1, checkpoint_every_steps >= 0");
  if (c.output_dir.empty()) fail("output_dir must not be empty");
}

}  // namespace

json default_config_json() {
  json j = json::object();
  for (const auto& k : schema()) j[pointer(k.path)] = k.fallback;
  return j;
}

std::string config_reference() {
  std::string out;
  for (const auto& k : schema()) {
    std::string line = std::string("  ") + k.path;
    line.resize(std::max<size_t>(line.size() + 1, 30), ' ');
    std::string type = std::string(kind_name(k.kind)) + (k.nullable ? " or null" : "");
    type.resize(std::max<size_t>(type.size() + 1, 26), ' ');
    out += line + type + "default " + k.fallback.dump() + "\n" + std::string(32, ' ') + k.help + "\n";
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
    if (k.kind == Kind::kInt && v.get<int64_t>() < 0 && std::string(k.path) != "seed")
      throw InputError(origin + ": " + k.path + " must not be negative");
    merged[ptr] = v;
  }
  TrainConfig c = to_struct(merged);
  check_values(c, origin);
  return c;
}

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
    json alone = json::object();  // a typo is the flag's fault, not the file's: check the key on its own first
    try {
      alone[pointer(key)] = value;
      check_keys(alone, "", "--set " + o);
      user[pointer(key)] = value;
    } catch (const json::exception&) {
      throw InputError("--set " + o + ": " + key + " is not a key inside an object of the configuration");
    }
  }
  return parse_train_config(user, origin);
}

}  // namespace loratune
