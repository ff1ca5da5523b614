// From a validated configuration to everything the training loop needs, decided in one place for `loratune train`
// and for C++ programs alike: device and precision, the model with seeded adapters and its head (zero-shot
// initialised when the config says so), where frozen weights are stored (a probe step falls back to fp32 when a
// model's graph breaks with 16-bit weights), and the loader options.
#pragma once

#include <c10/core/Device.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "loratune/amp.h"
#include "loratune/batch_source.h"
#include "loratune/config.h"
#include "loratune/model.h"
#include "loratune/optim.h"

namespace loratune {

// Sets a model's head from a text encoder's class embeddings (head.init zero_shot). The CLIP text side lives in the
// loratune_text library: pass loratune::zero_shot_head_initializer() from zero_shot.h.
using ZeroShotHeadInit =
    std::function<void(Model& model, const std::vector<std::string>& classes, const HeadConfig& head)>;

// loss contrastive: every prompt of each class as tokens, for the trainer to draw one per image from (loratune_text:
// class_prompt_maker() in zero_shot.h).
struct ClassPrompts {
  std::vector<at::Tensor> tokens;  // per class: [its names x templates, context] int64, on the CPU
  nlohmann::json record;           // {"templates": [...], "names": {"class": [names]}} (Adapter::prompts)
};
using ClassPromptMaker =
    std::function<ClassPrompts(const Model& model, const std::vector<std::string>& classes, const HeadConfig& head)>;

// Texts as the model's text tower takes them (loss contrastive on captions, retrieval): tokens [N, context] int64 on
// the CPU, and how many texts were longer than the context and cut (loratune_text: text_tokenizer_for() in
// zero_shot.h).
struct TokenizedTexts {
  at::Tensor tokens;
  int64_t truncated = 0;
};
using TextTokenizerFor = std::function<TokenizedTexts(const Model& model, const std::vector<std::string>& texts)>;

// The weights LoRA adapts in `bundle` under `settings`: lora.targets resolved, then kept to the last
// lora.last_blocks blocks. Training and `loratune info` both ask this (InputError when nothing is left).
std::vector<LoraTarget> adapted_targets(const Bundle& bundle, const LoraSettings& settings);

// The model training starts from: the bundle, the method's trainable tensors, seeded LoRA adapters (method lora)
// and its head (random, or zero-shot through `zero_shot`), on the CPU. Same config and seed, same tensors. With loss
// contrastive also the text tower (head.text_model, or the one the bundle names) with its seeded adapters
// (lora.text_targets), and the head, made from it, does not train.
// InputError when head.init is zero_shot and `zero_shot` is empty.
std::unique_ptr<Model> build_training_model(const TrainConfig& config, const std::vector<std::string>& classes,
                                            const ZeroShotHeadInit& zero_shot = {});

struct TrainingSetup {
  std::unique_ptr<Model> model;  // on `device`, frozen weights in `frozen_dtype`
  c10::Device device{c10::kCPU};
  Precision precision = Precision::kFp32;
  at::ScalarType frozen_dtype = at::kFloat;
  QuantFormat frozen_quant = QuantFormat::kNone;  // frozen_dtype int8 / nf4: the blocks' Linear weights
  LoaderOptions train_loader, val_loader;
  std::vector<std::string> warnings;  // for the user (e.g. the fp32 fallback of frozen weights and why)
  std::vector<std::string> notes;     // informative (e.g. frozen weights stored in bf16)
};

// AdamW over the model's trainable tensors with the config's betas, eps, weight decay, head learning rate and LoRA+
// ratio (on the tensors the adapters' variants call up-projections); the fp16 loss scaler (off otherwise).
std::unique_ptr<AdamW> make_optimizer(const TrainConfig& config, const Model& model);
std::unique_ptr<LossScaler> make_loss_scaler(const TrainConfig& config, Precision precision);

// Where `train` stores frozen weights for this precision: 16 bits with mixed precision on CUDA (or where the config
// says "compute"), else fp32. prepare_training falls back to fp32 when a model's graph breaks with 16-bit weights.
at::ScalarType frozen_dtype_for(const TrainConfig& config, Precision precision, const c10::Device& device);
// The quantisation frozen_dtype asks for (int8, nf4), else none.
QuantFormat frozen_quant_for(const TrainConfig& config);
// What `offload` asks for (applied on CUDA only).
OffloadSettings offload_settings_for(const TrainConfig& config);

TrainingSetup prepare_training(const TrainConfig& config, const std::vector<std::string>& classes,
                               const ZeroShotHeadInit& zero_shot = {});

}  // namespace loratune
