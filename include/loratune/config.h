// Training configuration: JSON with documented defaults. Unknown keys are errors that suggest the nearest valid
// key; wrong types name the JSON path; `--set key=value` overrides any key.
#pragma once

#include <filesystem>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "loratune/batch_source.h"
#include "loratune/lora.h"
#include "loratune/method.h"

namespace loratune {

// The structs mirror the JSON document: `optim.lr` in JSON is `config.optim.lr` here. A key's default is its
// member's initial value below (LoraSettings: lora.h; AugmentConfig: batch_source.h); everything else about it (type,
// range, choices, help, whether it changes results) is declared once, in the schema of config.cpp, which reads the
// default from a default-constructed TrainConfig. A config filled in code is checked with check_train_config().
struct DataConfig {
  std::string train;              // photo folder: <root>/<class>/...
  std::string val;                // held-out folder; empty: split `train` by `val_fraction`
  double val_fraction = 0.1;
  uint64_t split_seed = 0;
  int workers = 0;                // 0: one per CPU core
  int prefetch_batches = 4;
  CacheMode cache = CacheMode::kAuto;
  CacheMode prefix_cache = CacheMode::kAuto;  // reuse the frozen prefix's output across epochs
  int64_t max_image_pixels = kDefaultMaxImagePixels;  // larger images are skipped and listed; 0: no limit
  AugmentConfig augment;
  std::string captions;        // loss contrastive: a caption file (captions.h); empty: class prompts
  std::string caption_column;  // its text column; empty: the first of caption_columns() it has
};

// How the classification head starts: random, or from the text tower's class embeddings (CLIP-like models).
enum class HeadInit { kRandom, kZeroShot };
template <>
struct NamedEnum<HeadInit> {
  static constexpr std::pair<HeadInit, const char*> names[] = {{HeadInit::kRandom, "random"}, {HeadInit::kZeroShot, "zero_shot"}};
};

struct HeadConfig {
  HeadInit init = HeadInit::kRandom;
  std::string text_model;             // zero_shot: text encoder bundle (empty: the one the model names)
  std::string class_names;            // zero_shot: JSON file mapping folder names to prompt names
  std::vector<std::string> templates; // zero_shot: prompt templates (empty: defaults)
};

struct OptimConfig {
  double lr = 1e-3;
  double head_lr = -1;            // < 0: same as lr
  double weight_decay = 0.01;
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  double grad_clip = 1.0;
  double lora_plus_ratio = -1;    // LoRA+: lr of every B = this x lr; < 0: off
};

struct EarlyStoppingConfig {
  int64_t patience = -1;          // epochs without a better validation top-1 before training stops; < 0: off
};

struct ScheduleConfig {
  double warmup_fraction = 0.05;
  double min_lr_ratio = 0.0;
};

struct LossScaleConfig {
  double init = 65536.0;
  int64_t growth_interval = 2000;
};

// What training minimises: cross-entropy of the head's logits, or the contrastive loss of both towers (trainer.h).
enum class TrainingLoss { kCrossEntropy, kContrastive };
template <>
struct NamedEnum<TrainingLoss> {
  static constexpr std::pair<TrainingLoss, const char*> names[] = {
      {TrainingLoss::kCrossEntropy, "cross_entropy"}, {TrainingLoss::kContrastive, "contrastive"}};
};

// How frozen base weights are stored: auto (compute dtype on CUDA with mixed precision), fp32, the compute dtype, or
// the blocks' Linear weights quantised (int8, nf4).
enum class FrozenStorage { kAuto, kFp32, kCompute, kInt8, kNf4 };
template <>
struct NamedEnum<FrozenStorage> {
  static constexpr std::pair<FrozenStorage, const char*> names[] = {
      {FrozenStorage::kAuto, "auto"}, {FrozenStorage::kFp32, "fp32"}, {FrozenStorage::kCompute, "compute"},
      {FrozenStorage::kInt8, "int8"}, {FrozenStorage::kNf4, "nf4"}};
};

// What moves to the host during training (CUDA; BlockStack::set_offload).
enum class OffloadMode { kNone, kWeights, kActivations, kBoth };
template <>
struct NamedEnum<OffloadMode> {
  static constexpr std::pair<OffloadMode, const char*> names[] = {
      {OffloadMode::kNone, "none"}, {OffloadMode::kWeights, "weights"}, {OffloadMode::kActivations, "activations"},
      {OffloadMode::kBoth, "both"}};
};

// Which pairs are a contrastive row's negatives: every other pair of the optimiser step (embeddings cached across the
// micro-batches: the memory of one), or those of its micro-batch only.
enum class ContrastiveNegatives { kStep, kMicroBatch };
template <>
struct NamedEnum<ContrastiveNegatives> {
  static constexpr std::pair<ContrastiveNegatives, const char*> names[] = {
      {ContrastiveNegatives::kStep, "step"}, {ContrastiveNegatives::kMicroBatch, "micro_batch"}};
};

struct ContrastiveConfig {
  ContrastiveNegatives negatives = ContrastiveNegatives::kStep;
};

struct TrainConfig {
  std::string model;
  DataConfig data;
  Method method = Method::kLora;
  LoraSettings lora;
  PromptSettings vpt;  // method vpt
  AdaptFormerSettings adaptformer;  // method adaptformer
  HeadConfig head;
  OptimConfig optim;
  ScheduleConfig schedule;
  int64_t batch_size = 16;
  int64_t grad_accum_steps = 1;
  int64_t epochs = 10;
  int64_t max_steps = -1;         // optimiser steps; < 0: from epochs
  TrainingLoss loss = TrainingLoss::kCrossEntropy;
  ContrastiveConfig contrastive;
  double label_smoothing = 0.0;
  std::string precision = "auto";
  FrozenStorage frozen_dtype = FrozenStorage::kAuto;
  bool gradient_checkpointing = true;
  OffloadMode offload = OffloadMode::kNone;
  LossScaleConfig loss_scale;
  EarlyStoppingConfig early_stopping;
  std::string device = "auto";
  int threads = -1;               // kAutoThreads (threads.h): follow the load; 0: all cores; N: pinned
  uint64_t seed = 0;
  std::string output_dir = "runs/default";
  int64_t eval_every_epochs = 1;
  int64_t checkpoint_every_steps = 0;  // 0: at the end of each epoch only
  int64_t log_every_steps = 10;
};

// The resolved configuration without the keys that do not change what training computes (where it runs, how
// often it reports), and with files and folders by their names alone: what adapters record and what a resumed run
// must match.
nlohmann::json result_settings(const nlohmann::json& resolved);
// Where a run's recorded result settings (result_settings, "precision" resolved) and this one's differ, one
// "key recorded vs now" each; empty: resuming continues the same computation. Numbers compare by value. A key the
// recording version did not know (added by an upgrade) must be at its default here; a key this version no longer
// has is not compared.
std::vector<std::string> changed_settings(const nlohmann::json& recorded, const nlohmann::json& now);

// The full configuration with defaults, as JSON.
nlohmann::json default_config_json();
// `config` as the JSON document it stands for, every key present (null for keys that are not set).
nlohmann::json config_json(const TrainConfig& config);
// Every key's type, range and choices and the rules between keys, as for a file: InputError naming the key and what
// to do. For configs filled in code; run_training() and Trainer check theirs.
void check_train_config(const TrainConfig& config);
// One line per key: path, type, default, description (for --help and docs).
std::string config_reference();

// Reads `path` (may be empty: defaults only), applies `overrides` ("lora.rank=16", "data.val=null"), validates.
TrainConfig load_train_config(const std::filesystem::path& path, const std::vector<std::string>& overrides);
// `config` with "key=value" overrides applied, validated again (e.g. the settings a memory fit chose).
TrainConfig with_overrides(const TrainConfig& config, const std::vector<std::string>& overrides);
// Validates a JSON document against the schema and fills in defaults.
TrainConfig parse_train_config(const nlohmann::json& user, const std::string& origin);

}  // namespace loratune
