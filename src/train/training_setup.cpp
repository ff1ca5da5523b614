#include "loratune/training_setup.h"
#include "loratune/adapter_variant.h"
#include "loratune/targets.h"

#include "loratune/device.h"
#include "loratune/errors.h"
#include "loratune/train_step.h"

namespace loratune {
namespace {

// One forward and backward pass on a small batch: catches models whose traced graphs fix a dtype and break with
// frozen weights stored in 16 bits. Returns the error's last line, or "" when the step works.
std::string probe_training_step(Model& model, const c10::Device& device, Precision precision, bool checkpoint) {
  try {
    const int64_t s = model.bundle().info.image_size;
    const at::Tensor x = at::zeros({1, 3, s, s}, at::TensorOptions().device(device));
    at::Tensor logits;
    {
      AutocastScope autocast(device, precision);
      logits = model.logits(x, checkpoint);
    }
    logits.to(at::kFloat).sum().backward();
    discard_gradients(model.trainable());
    return "";
  } catch (const std::exception& e) {
    // The last line of a TorchScript error says what went wrong; the lines above are its traceback.
    std::string text = e.what();
    while (!text.empty() && (text.back() == '\n' || text.back() == ' ')) text.pop_back();
    const size_t newline = text.rfind('\n');
    return (newline == std::string::npos ? text : text.substr(newline + 1)).substr(0, 300);
  }
}

// The targets inside the last `n` blocks (all when n < 0).
std::vector<LoraTarget> in_last_blocks(std::vector<LoraTarget> targets, const Bundle& bundle, int64_t n) {
  if (n < 0) return targets;
  if (!bundle.has_block_structure())
    throw InputError("lora.last_blocks needs a model with a stem/blocks/head structure; " + bundle.path.string() +
                     " has none (re-export it with scripts/export/), or set lora.last_blocks to null");
  std::vector<std::string> paths;
  for (const auto& child : bundle.blocks_module().named_children()) paths.push_back(bundle.info.blocks + "." + child.name);
  if (n > static_cast<int64_t>(paths.size()))
    throw InputError("lora.last_blocks " + std::to_string(n) + " is more than the " + std::to_string(paths.size()) +
                     " blocks of " + bundle.path.string() + "; use 1 to " + std::to_string(paths.size()) + " or null");
  std::vector<LoraTarget> kept;
  for (auto& t : targets)
    for (size_t b = paths.size() - static_cast<size_t>(n); b < paths.size(); ++b)
      if (t.module.compare(0, paths[b].size() + 1, paths[b] + ".") == 0) {
        kept.push_back(std::move(t));
        break;
      }
  if (kept.empty())
    throw InputError("no LoRA target lies inside the last " + std::to_string(n) + " blocks of " + bundle.path.string() +
                     "; raise lora.last_blocks or change lora.targets");
  return kept;
}

std::unique_ptr<Model> model_on_device(const TrainConfig& c, const std::vector<std::string>& classes,
                                       const ZeroShotHeadInit& zero_shot, const c10::Device& device,
                                       at::ScalarType frozen, QuantFormat quant) {
  auto model = build_training_model(c, classes, zero_shot);
  if (device.is_cuda()) model->blocks().set_offload(offload_settings_for(c));
  model->to(device, frozen, quant);
  return model;
}

}  // namespace

std::vector<LoraTarget> adapted_targets(const Bundle& bundle, const LoraSettings& settings) {
  return in_last_blocks(resolve_targets(bundle.module, settings, bundle.info.blocks), bundle, settings.last_blocks);
}

std::unique_ptr<Model> build_training_model(const TrainConfig& c, const std::vector<std::string>& classes,
                                            const ZeroShotHeadInit& zero_shot) {
  torch::manual_seed(static_cast<uint64_t>(c.seed));
  auto model = std::make_unique<Model>(load_bundle(c.model));
  model->set_method(c.method);
  if (c.method == Method::kLora) {
    auto targets = adapted_targets(model->bundle(), c.lora);
    init_adapter_tensors(targets, model->module(), adapter_init_by_name(c.lora.init));
    model->set_adapters(targets, c.lora);
  }
  if (c.method == Method::kVpt) model->init_prompts(c.vpt);
  if (c.method == Method::kAdaptFormer) model->init_mlp_adapters(c.adaptformer);
  if (c.loss == TrainingLoss::kContrastive) {
    model->set_text_tower(load_bundle(c.head.text_model.empty() ? text_model_for(model->bundle())
                                                                : text_tower_path(c.head.text_model)));
    LoraSettings text_settings = c.lora;
    text_settings.targets = c.lora.text_targets;
    const torch::jit::Module& text = model->text_bundle().module;
    auto text_targets = resolve_targets(text, text_settings, model->text_bundle().info.blocks);
    init_adapter_tensors(text_targets, text, adapter_init_by_name(c.lora.init));
    model->set_text_adapters(text_targets);
    model->head().set_trainable(false);
  }
  model->head().init(static_cast<int64_t>(classes.size()));
  if (c.head.init == HeadInit::kZeroShot) {
    if (!zero_shot)
      throw InputError("head.init zero_shot needs the CLIP text encoder: link loratune_text and pass "
                       "loratune::zero_shot_head_initializer()");
    zero_shot(*model, classes, c.head);
  }
  return model;
}

std::unique_ptr<AdamW> make_optimizer(const TrainConfig& c, const Model& model) {
  auto optimizer = std::make_unique<AdamW>(
      model.trainable(), AdamWOptions{c.optim.beta1, c.optim.beta2, c.optim.eps, c.optim.weight_decay});
  if (c.optim.head_lr > 0) {
    optimizer->set_lr_multiplier("head.weight", c.optim.head_lr / c.optim.lr);
    optimizer->set_lr_multiplier("head.bias", c.optim.head_lr / c.optim.lr);
  }
  if (c.optim.lora_plus_ratio > 0 && model.method() == Method::kLora)  // LoRA+ (Hayou et al. 2024): B learns faster
    for (const auto* targets : {&model.adapters(), &model.text_adapters()})
      for (const auto& t : *targets) {
        const auto& specs = t.variant->tensor_specs();
        for (size_t k = 0; k < specs.size(); ++k)
          if (specs[k].up_projection) optimizer->set_lr_multiplier(t.tensor_name(k), c.optim.lora_plus_ratio);
      }
  return optimizer;
}

std::unique_ptr<LossScaler> make_loss_scaler(const TrainConfig& c, Precision precision) {
  LossScaler::Options options;
  options.init_scale = c.loss_scale.init;
  options.growth_interval = c.loss_scale.growth_interval;
  return std::make_unique<LossScaler>(precision == Precision::kFp16, options);
}

at::ScalarType frozen_dtype_for(const TrainConfig& c, Precision precision, const c10::Device& device) {
  const bool mixed = precision != Precision::kFp32;
  const bool compact =
      c.frozen_dtype == FrozenStorage::kCompute || (c.frozen_dtype != FrozenStorage::kFp32 && device.is_cuda());
  return compact && mixed && c.method != Method::kFull ? compute_dtype(precision) : at::kFloat;
}

OffloadSettings offload_settings_for(const TrainConfig& c) {
  return {c.offload == OffloadMode::kWeights || c.offload == OffloadMode::kBoth,
          c.offload == OffloadMode::kActivations || c.offload == OffloadMode::kBoth};
}

QuantFormat frozen_quant_for(const TrainConfig& c) {
  switch (c.frozen_dtype) {
    case FrozenStorage::kInt8: return QuantFormat::kInt8;
    case FrozenStorage::kNf4: return QuantFormat::kNf4;
    default: return QuantFormat::kNone;
  }
}

TrainingSetup prepare_training(const TrainConfig& c, const std::vector<std::string>& classes,
                               const ZeroShotHeadInit& zero_shot) {
  TrainingSetup s;
  s.device = resolve_device(c.device);
  s.precision = resolve_precision(c.precision, s.device);
  s.frozen_dtype = frozen_dtype_for(c, s.precision, s.device);
  s.frozen_quant = frozen_quant_for(c);
  s.model = model_on_device(c, classes, zero_shot, s.device, s.frozen_dtype, s.frozen_quant);
  if (s.frozen_dtype != at::kFloat) {
    const std::string problem = probe_training_step(*s.model, s.device, s.precision, c.gradient_checkpointing);
    if (!problem.empty()) {
      s.warnings.push_back("frozen weights stay in fp32: the model fails with " + precision_name(s.precision) +
                           "-stored weights (" + problem + ")");
      s.frozen_dtype = at::kFloat;
      s.model = model_on_device(c, classes, zero_shot, s.device, s.frozen_dtype, s.frozen_quant);
    } else {
      s.notes.push_back("frozen base weights stored as " + precision_name(s.precision));
    }
  }
  if (s.frozen_quant != QuantFormat::kNone) s.notes.push_back(quantization_note(s.model->frozen_quantization()));
  if (c.offload != OffloadMode::kNone && !s.device.is_cuda())
    s.notes.push_back("offload " + enum_name(c.offload) + " applies on CUDA; on the CPU it does nothing");
  if (s.model->blocks().offload().weights) s.notes.push_back("offload: two blocks' frozen weights on the GPU at a time");
  if (s.model->blocks().offload().activations) s.notes.push_back("offload: checkpointed blocks keep their inputs in host memory");

  s.train_loader.batch_size = c.batch_size;
  s.train_loader.shuffle = s.train_loader.augment = true;  // the last, smaller batch trains too
  s.train_loader.augmentation = c.data.augment;
  s.train_loader.seed = c.seed;
  s.train_loader.workers = c.data.workers;
  s.train_loader.prefetch_batches = c.data.prefetch_batches;
  s.train_loader.cache = c.data.cache;
  s.train_loader.pin_memory = s.device.is_cuda();
  s.train_loader.max_image_pixels = c.data.max_image_pixels;
  s.val_loader = s.train_loader;
  s.val_loader.shuffle = s.val_loader.augment = false;
  return s;
}

}  // namespace loratune
