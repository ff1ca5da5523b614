#include "loratune/model.h"

#include <ATen/core/grad_mode.h>
#include <utility>

#include "lora/adapter_host.h"
#include "model/adapted_tower.h"
#include "loratune/adapter_variant.h"
#include "loratune/cpu_allocator.h"
#include "loratune/errors.h"
#include "model/gradient_checkpoint.h"
#include "quant/frozen_weights.h"

namespace loratune {
namespace {

// Frozen weights stored in `dtype` (16 bits halve them; autocast computes in its own dtype anyway). Quantised
// weights keep their formats.
void store_frozen(torch::jit::Module module, at::ScalarType dtype) {
  at::NoGradGuard no_grad;
  for (auto p : module.parameters())
    if (p.is_floating_point()) p.set_data(p.data().to(dtype));
  for (const auto& b : module.named_buffers())
    if (b.value.is_floating_point() && !is_quantized_weight_buffer(b.name)) b.value.set_data(b.value.data().to(dtype));
}

}  // namespace

Model::Model(Bundle bundle)
    : image_(std::make_unique<AdaptedTower>(std::move(bundle))),
      head_(image_->bundle().info.feature_dim),
      stack_(image_->bundle()) {
  const Bundle& b = image_->bundle();
  if (b.info.kind != "backbone")
    throw InputError(b.path.string() + " is a merged classifier, not a backbone bundle; train and merge on the "
                     "original model file");
  set_method(Method::kLora);
}

Model::~Model() = default;

const Bundle& Model::bundle() const { return image_->bundle(); }
torch::jit::Module& Model::module() { return image_->bundle().module; }
const std::vector<LoraTarget>& Model::adapters() const { return image_->adapters(); }

bool Model::dropout_applies() const { return image_->host().dropout_applies(); }
std::string Model::dropout_note() const { return image_->host().dropout_note(lora_settings_.dropout); }

void Model::prepare_adapters(const std::vector<LoraTarget>& targets) { image_->host().prepare(targets); }

void Model::set_adapters(std::vector<LoraTarget> targets, const LoraSettings& settings) {
  image_->set_adapters(std::move(targets), settings.dropout, device_, "adapter");
  lora_settings_ = settings;
  set_method(method_);
}

void Model::clear_adapters() {
  image_->clear_adapters();
  if (text_) text_->clear_adapters();
  set_method(method_);
}

void Model::set_text_tower(Bundle text) {
  if (text.info.kind != "text_encoder")
    throw InputError(text.path.string() + " is not a text encoder bundle (kind \"" + text.info.kind + "\")");
  if (text.info.feature_dim != bundle().info.feature_dim)
    throw InputError(text.path.string() + " gives " + std::to_string(text.info.feature_dim) + "-d embeddings, but " +
                     bundle().path.string() + " gives " + std::to_string(bundle().info.feature_dim) + "-d ones");
  for (const auto& p : text.module.parameters()) p.requires_grad_(false);
  text_grad_dependent_ = has_grad_mode_dependent_kernels(text.module);
  text_ = std::make_unique<AdaptedTower>(std::move(text));
  text_->bundle().module.to(device_);
}

const Bundle& Model::text_bundle() const {
  if (!text_) throw RuntimeFailure("internal: the model has no text tower");
  return text_->bundle();
}

const std::vector<LoraTarget>& Model::text_adapters() const {
  static const std::vector<LoraTarget> none;
  return text_ ? text_->adapters() : none;
}

void Model::set_text_adapters(std::vector<LoraTarget> targets) {
  if (!text_) throw RuntimeFailure("internal: text adapters without a text tower");
  for (const auto& t : targets)
    for (const auto& image : adapters())
      if (image.name() == t.name())
        throw InputError("the text tower's " + t.module + " has the same path as an image tower weight; the towers "
                         "must name their modules apart (re-export them)");
  text_->set_adapters(std::move(targets), lora_settings_.dropout, device_, "text adapter");
  set_method(method_);
}

at::Tensor Model::text_features(const at::Tensor& tokens, bool checkpoint) {
  if (!text_) throw RuntimeFailure("internal: the model has no text tower");
  if (checkpoint && at::GradMode::is_enabled() && !text_->adapters().empty())
    return checkpointed_block(text_->bundle().module, tokens, text_->adapter_tensors(), text_grad_dependent_);
  return run_block(text_->bundle().module, tokens);
}

void Model::set_method(Method method) {
  method_ = method;
  for (const auto& p : module().parameters()) p.requires_grad_(method == Method::kFull);
  image_->set_adapters_trainable(method);
  if (text_) text_->set_adapters_trainable(method);
  prompts_.set_trainable(method == Method::kVpt);
  mlp_adapters_.set_trainable(method == Method::kAdaptFormer);
  refresh_block_parameters();
}

void Model::init_prompts(const PromptSettings& settings) {
  prompts_.init(settings, token_layout(bundle()), stack_.size());
  prompts_.to(device_);
  prompts_.set_trainable(method_ == Method::kVpt);
  refresh_block_parameters();
}

void Model::set_prompts(const PromptSettings& settings, const std::vector<at::Tensor>& sets, const std::string& origin) {
  prompts_.set(settings, token_layout(bundle()), stack_.size(), sets, origin);
  prompts_.to(device_);
  prompts_.set_trainable(method_ == Method::kVpt);
  refresh_block_parameters();
}

void Model::clear_prompts() {
  prompts_.clear();
  refresh_block_parameters();
}

void Model::init_mlp_adapters(const AdaptFormerSettings& settings) {
  mlp_adapters_.init(settings, bundle());
  mlp_adapters_.set_trainable(method_ == Method::kAdaptFormer);
  mlp_adapters_.to(device_);
  refresh_block_parameters();
}

void Model::set_mlp_adapters(const AdaptFormerSettings& settings, const std::vector<std::vector<at::Tensor>>& tensors,
                             const std::string& origin) {
  mlp_adapters_.set(settings, bundle(), tensors, origin);
  mlp_adapters_.set_trainable(method_ == Method::kAdaptFormer);
  mlp_adapters_.to(device_);
  refresh_block_parameters();
}

void Model::clear_mlp_adapters() {
  mlp_adapters_.clear();
  refresh_block_parameters();
}

void Model::refresh_block_parameters() {
  stack_.assign_trainable(method_, adapters(), prompts_.defined(), mlp_adapters_.tensors());
}

std::vector<NamedTensor> Model::trainable() const {
  std::vector<NamedTensor> out;
  if (method_ == Method::kFull)
    for (const auto& p : bundle().module.named_parameters()) out.push_back({"base." + p.name, p.value});
  if (method_ == Method::kLora) {
    image_->append_trainable(out);
    if (text_) text_->append_trainable(out);
  }
  if (method_ == Method::kVpt) prompts_.append_trainable(out);
  if (method_ == Method::kAdaptFormer) mlp_adapters_.append_trainable(out);
  head_.append_trainable(out);
  return out;
}

int64_t Model::trainable_count() const {
  int64_t n = 0;
  for (const auto& t : trainable()) n += t.tensor.numel();
  return n;
}

int64_t Model::base_parameter_count() const {
  int64_t n = quantization_.parameters;  // their dense weights are empty now
  n += stack_.offloaded_parameter_count();  // so are the offloaded ones' slots
  for (const auto& p : bundle().module.parameters()) n += p.numel();
  return n;
}

int64_t Model::total_count() const {
  int64_t n = base_parameter_count();
  n += image_->adapter_parameter_count();
  n += prompts_.parameter_count();
  n += mlp_adapters_.parameter_count();
  n += head_.parameter_count();
  if (text_) {
    for (const auto& p : text_->bundle().module.parameters()) n += p.numel();
    n += text_->adapter_parameter_count();
  }
  return n;
}

void Model::to(const c10::Device& device, at::ScalarType frozen_dtype, QuantFormat frozen_quant) {
  if (frozen_quant != QuantFormat::kNone && quantization_.format == QuantFormat::kNone) {
    if (!freezes_base(method_)) throw InputError("quantised frozen weights need a frozen base (not method full)");
    if (stack_.empty())
      throw InputError(bundle().path.filename().string() + " has no block structure: its Linear weights cannot be "
                       "quantised block by block (export it with blocks, or use frozen_dtype compute)");
    quantization_ = quantize_frozen_linears(module(), stack_.paths(), frozen_quant, device);
    if (quantization_.modules == 0)
      throw InputError("frozen_dtype " + quant_format_name(frozen_quant) + ": no frozen Linear weight in the blocks "
                       "can be quantised (each is read outside nn.Linear, e.g. by DoRA adapters); use frozen_dtype "
                       "compute");
  }
  if (stack_.offload().any() && !stack_.offloading()) {
    if (!freezes_base(method_)) throw InputError("offload needs a frozen base, not method full (it moves frozen weights)");
    if (stack_.empty())
      throw InputError(bundle().path.filename().string() + " has no block structure: it cannot be offloaded block by "
                       "block (export it with blocks, or set offload to none)");
    // The host copies keep the storage dtype; what stays in the module (placeholders) moves below.
    if (frozen_dtype != at::kFloat) store_frozen(module(), frozen_dtype);
    stack_.start_offload(device);
    release_cached_cpu_memory();
  } else if (stack_.offloading() && device != device_) {
    throw RuntimeFailure("internal: an offloaded model cannot move to another device");
  }
  device_ = device;
  module().to(device);
  if (frozen_dtype != at::kFloat && freezes_base(method_)) store_frozen(module(), frozen_dtype);
  image_->move_adapters(device, lora_settings_.dropout);
  prompts_.to(device);
  mlp_adapters_.to(device);
  if (text_) {
    text_->bundle().module.to(device);
    if (frozen_dtype != at::kFloat) store_frozen(text_->bundle().module, frozen_dtype);
    text_->move_adapters(device, lora_settings_.dropout);
  }
  head_.to(device);
  refresh_block_parameters();
}

void Model::set_training(bool training) {
  image_->host().set_training(training);
  if (text_) text_->host().set_training(training);
}

bool Model::has_frozen_prefix() const { return !stack_.empty() && freezes_base(method_); }

at::Tensor Model::prefix(const at::Tensor& images) {
  if (!has_frozen_prefix()) throw RuntimeFailure("internal: the model has no frozen prefix");
  at::NoGradGuard no_grad;  // nothing here trains: keep no activations
  at::Tensor h = stack_.run(module().get_method("stem")({images}).toTensor(), 0, stack_.frozen_prefix(), false);
  if (method_ == Method::kLinearProbe) h = module().get_method("head")({h}).toTensor();
  // One memory layout, whether the next step gets this tensor or cached rows stacked again: kernels may
  // differ by layout and the results in their last bits.
  return h.contiguous();
}

at::Tensor Model::features_from_prefix(const at::Tensor& hidden, bool checkpoint) {
  if (method_ == Method::kLinearProbe) return hidden;
  return module().get_method("head")({run_blocks(hidden, stack_.frozen_prefix(), checkpoint)}).toTensor();
}

at::Tensor Model::run_blocks(at::Tensor h, int64_t first, bool checkpoint) {
  if (!prompts_.defined()) return stack_.run(std::move(h), first, stack_.size(), checkpoint);
  if (first != 0) throw RuntimeFailure("internal: prompt tokens join before the first block");
  const int64_t tokens = h.size(prompts_.layout().sequence_dim);
  for (int64_t i = 0; i < stack_.size(); ++i) {
    if (prompts_.joins_before(i)) h = prompts_.join(h, tokens, i);
    h = stack_.run(h, i, i + 1, checkpoint);
  }
  return prompts_.drop(h, tokens);
}

at::Tensor Model::features(const at::Tensor& images, bool checkpoint) {
  const bool grad = at::GradMode::is_enabled();
  if (stack_.empty()) {
    // No per-block structure: one call, gradients only if something in the base trains.
    at::AutoGradMode mode(grad && method_ != Method::kLinearProbe);
    return module().forward({images}).toTensor();
  }
  if (has_frozen_prefix()) return features_from_prefix(prefix(images), checkpoint);
  // Method full: everything trains.
  const at::Tensor h = run_blocks(module().get_method("stem")({images}).toTensor(), 0, checkpoint);
  return module().get_method("head")({h}).toTensor();
}

int64_t Model::block_output_bytes(const at::Tensor& images) {
  if (stack_.empty()) return 0;
  at::NoGradGuard no_grad;
  const at::Tensor h = stack_.run(module().get_method("stem")({images}).toTensor(), 0, 1, false);
  return static_cast<int64_t>(h.nbytes()) / std::max<int64_t>(1, images.size(0));
}

at::Tensor Model::logits(const at::Tensor& images, bool checkpoint) { return head_.logits(features(images, checkpoint)); }

at::Tensor Model::logits_from_prefix(const at::Tensor& prefix_output, bool checkpoint) {
  return head_.logits(features_from_prefix(prefix_output, checkpoint));
}

}  // namespace loratune
