// A bundle with adapters and a classification head: what `train`, `eval`, `predict` and `merge` work on.
#pragma once

#include <torch/script.h>

#include <memory>
#include <string>
#include <vector>

#include "loratune/block_stack.h"
#include "loratune/bundle.h"
#include "loratune/classifier_head.h"
#include "loratune/lora.h"
#include "loratune/method.h"
#include "loratune/mlp_adapters.h"
#include "loratune/named_tensor.h"
#include "loratune/prompt_tokens.h"
#include "loratune/quantize.h"

namespace loratune {

class AdaptedTower;

class Model {
 public:
  explicit Model(Bundle bundle);
  ~Model();
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;

  const Bundle& bundle() const;
  torch::jit::Module& module();
  const c10::Device& device() const { return device_; }

  // Adapters: prepares the model's types (before the first forward) and binds the tensors. `settings` are the ones
  // the adapters were made with (dropout applies in training; adapter files record them).
  void set_adapters(std::vector<LoraTarget> targets, const LoraSettings& settings);
  // Prepares module types for targets that will be attached later (several adapters for one base).
  void prepare_adapters(const std::vector<LoraTarget>& targets);
  void clear_adapters();
  const std::vector<LoraTarget>& adapters() const;
  const LoraSettings& lora_settings() const { return lora_settings_; }
  // Whether lora_settings().dropout reaches any adapter: not where adapters change the weight itself (DoRA, weights
  // read outside nn.Linear), and the adapter file then records dropout 0.
  bool dropout_applies() const;
  // For the user: one line saying where the settings' dropout does not apply, or "".
  std::string dropout_note() const;

  // CLIP's text tower, trained alongside the image tower (loss contrastive): tokens [N, context] -> embeddings
  // [N, D]. Its adapters are text_adapters(); they join trainable(), to() and set_training() with the image's.
  void set_text_tower(Bundle text);
  bool has_text_tower() const { return text_ != nullptr; }
  const Bundle& text_bundle() const;
  // After set_adapters (the settings are shared). Their tensor names must differ from the image adapters'.
  void set_text_adapters(std::vector<LoraTarget> targets);
  const std::vector<LoraTarget>& text_adapters() const;
  // With `checkpoint`, the tower is one recomputed segment: only the tokens are kept for backward.
  at::Tensor text_features(const at::Tensor& tokens, bool checkpoint = false);

  // Prompt tokens before the blocks (method vpt): fresh ones, or ones from a file (InputError naming `origin` where
  // they do not fit); they train under method vpt.
  void init_prompts(const PromptSettings& settings);
  void set_prompts(const PromptSettings& settings, const std::vector<at::Tensor>& sets, const std::string& origin);
  void clear_prompts();
  const PromptTokens& prompts() const { return prompts_; }

  // AdaptFormer's adapters beside each block's MLP (method adaptformer): fresh ones, or ones from a file; they train
  // under method adaptformer.
  void init_mlp_adapters(const AdaptFormerSettings& settings);
  void set_mlp_adapters(const AdaptFormerSettings& settings, const std::vector<std::vector<at::Tensor>>& tensors,
                        const std::string& origin);
  void clear_mlp_adapters();
  const MlpAdapters& mlp_adapters() const { return mlp_adapters_; }

  // The classification head on the features (its tensors follow to(); it joins trainable() while it trains).
  ClassifierHead& head() { return head_; }
  const ClassifierHead& head() const { return head_; }

  // Which tensors train (adapters, prompts, every weight, the head); the rest of the base gets requires_grad = false.
  void set_method(Method method);
  Method method() const { return method_; }
  std::vector<NamedTensor> trainable() const;
  int64_t trainable_count() const;
  int64_t total_count() const;  // base + adapters + head

  // Moves everything to `device`; frozen base weights are stored as `frozen_dtype` (fp16/bf16 halves them). With
  // `frozen_quant` (a frozen base, once, after the adapters are set), the frozen Linear weights inside the blocks are
  // quantised one by one on `device` and dequantised only while their layer runs; the rest stays `frozen_dtype`.
  void to(const c10::Device& device, at::ScalarType frozen_dtype = at::kFloat,
          QuantFormat frozen_quant = QuantFormat::kNone);
  const FrozenQuantization& frozen_quantization() const { return quantization_; }

  // The backbone's blocks: what trains in each, the frozen prefix, checkpointing and offloading (set_offload
  // before to(), which starts it).
  BlockStack& blocks() { return stack_; }
  const BlockStack& blocks() const { return stack_; }

  // LoRA dropout on/off (the base always runs in eval mode: no dropout, BatchNorm statistics frozen).
  void set_training(bool training);

  // Forward. With `checkpoint`, each block that needs gradients is recomputed in backward instead of keeping
  // its activations.
  at::Tensor features(const at::Tensor& images, bool checkpoint = false);
  at::Tensor logits(const at::Tensor& images, bool checkpoint = false);

  // The frozen prefix: the stem and the leading blocks without trainable tensors (blocks().frozen_prefix(); and the
  // head too for a linear probe). Its output depends on the image only, so it can be computed once and cached.
  // Empty for method full.
  bool has_frozen_prefix() const;
  at::Tensor prefix(const at::Tensor& images);
  at::Tensor logits_from_prefix(const at::Tensor& prefix_output, bool checkpoint = false);
  at::Tensor features_from_prefix(const at::Tensor& prefix_output, bool checkpoint = false);

  // For memory planning: the bytes per image of a block's output for `images` (run without gradients).
  int64_t block_output_bytes(const at::Tensor& images);

  // Parameter counts for reports.
  int64_t base_parameter_count() const;

 private:
  void refresh_block_parameters();
  // Blocks [first, end) on `h`, prompt tokens joined before them and dropped after the last.
  at::Tensor run_blocks(at::Tensor h, int64_t first, bool checkpoint);
  // The two towers, adapted alike (src/model/adapted_tower.h); the image one is the backbone.
  std::unique_ptr<AdaptedTower> image_;
  std::unique_ptr<AdaptedTower> text_;
  bool text_grad_dependent_ = false;  // see has_grad_mode_dependent_kernels
  LoraSettings lora_settings_;
  ClassifierHead head_;
  BlockStack stack_;
  PromptTokens prompts_;
  MlpAdapters mlp_adapters_;
  FrozenQuantization quantization_;
  Method method_ = Method::kLora;
  c10::Device device_{c10::kCPU};
};

}  // namespace loratune
