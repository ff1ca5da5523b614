// A bundle with adapters and a classification head: what `train`, `eval`, `predict` and `merge` work on.
#pragma once

#include <torch/script.h>

#include <memory>
#include <string>
#include <vector>

#include "loratune/bundle.h"
#include "loratune/lora.h"
#include "loratune/method.h"
#include "loratune/named_tensor.h"
#include "loratune/quantize.h"

namespace loratune {

class AdaptedTower;
class BlockOffload;

// What stays in host memory during training (meant for CUDA; see Model::set_offload).
struct OffloadSettings {
  bool weights = false;      // the blocks' frozen tensors, copied to the device one block ahead of use
  bool activations = false;  // the inputs checkpointed blocks keep for backward, copied back one block ahead
  bool any() const { return weights || activations; }
};

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

  // Classification head: logits = features @ W^T + b.
  void init_head(int64_t num_classes);  // nn.Linear's default initialisation, global generator
  void set_head(at::Tensor weight, at::Tensor bias);
  bool has_head() const { return head_weight_.defined(); }
  // Cosine classifier: features are L2-normalised before the head (zero-shot CLIP heads).
  void set_normalize_features(bool on) { normalize_features_ = on; }
  bool normalize_features() const { return normalize_features_; }
  const at::Tensor& head_weight() const { return head_weight_; }
  const at::Tensor& head_bias() const { return head_bias_; }
  // Whether the head trains (in trainable()); not where the text tower gives it (loss contrastive).
  void set_head_trainable(bool on);
  bool head_trainable() const { return head_trainable_; }

  // Which tensors train; the rest of the base gets requires_grad = false.
  void set_method(Method method);
  Method method() const { return method_; }
  std::vector<NamedTensor> trainable() const;
  int64_t trainable_count() const;
  int64_t total_count() const;  // base + adapters + head

  // Moves everything to `device`; frozen base weights are stored as `frozen_dtype` (fp16/bf16 halves them). With
  // `frozen_quant` (method lora, once, after the adapters are set), the frozen Linear weights inside the blocks are
  // quantised one by one on `device` and dequantised only while their layer runs; the rest stays `frozen_dtype`.
  void to(const c10::Device& device, at::ScalarType frozen_dtype = at::kFloat,
          QuantFormat frozen_quant = QuantFormat::kNone);
  const FrozenQuantization& frozen_quantization() const { return quantization_; }

  // Offloading to host memory (method lora), applied by the next to(): the blocks' frozen tensors stay in host memory
  // (pinned on CUDA) in their storage dtype, quantised or not, and only the running block's and the next one's are
  // on the device (in backward too); with checkpointing, the blocks' saved inputs go to host memory and come back one
  // block ahead in backward. On CUDA the copies run on a side stream; on the CPU the same schedule runs with plain
  // copies (nothing is saved there: training leaves it off on the CPU).
  void set_offload(OffloadSettings settings);
  const OffloadSettings& offload() const { return offload_settings_; }
  // Bytes of frozen weights waiting in host memory (weight offload).
  int64_t offloaded_weight_bytes() const;
  // The most blocks whose weights were on the device at once since the last call (0 without weight offload).
  int64_t take_peak_resident_blocks();

  // LoRA dropout on/off (the base always runs in eval mode: no dropout, BatchNorm statistics frozen).
  void set_training(bool training);

  // Forward. With `checkpoint`, each block that needs gradients is recomputed in backward instead of keeping
  // its activations.
  at::Tensor features(const at::Tensor& images, bool checkpoint = false);
  at::Tensor logits(const at::Tensor& images, bool checkpoint = false);

  // The frozen prefix: the stem and the leading blocks without trainable tensors (and the head too for a linear
  // probe). Its output depends on the image only, so it can be computed once and cached. Empty for method full.
  bool has_frozen_prefix() const;
  int64_t frozen_prefix_blocks() const { return prefix_blocks_; }
  at::Tensor prefix(const at::Tensor& images);
  at::Tensor logits_from_prefix(const at::Tensor& prefix_output, bool checkpoint = false);
  at::Tensor features_from_prefix(const at::Tensor& prefix_output, bool checkpoint = false);

  // For memory planning: blocks that train (after the frozen prefix), and the bytes per image of a block's output
  // for `images` (run without gradients).
  int64_t trained_block_count() const { return static_cast<int64_t>(blocks_.size()) - prefix_blocks_; }
  int64_t block_output_bytes(const at::Tensor& images);

  // Parameter counts for reports.
  int64_t base_parameter_count() const;

 private:
  void refresh_block_parameters();
  // Runs blocks [first, last) on `h`, checkpointed where `checkpoint` and gradients are on, offloading if set.
  at::Tensor run_blocks(at::Tensor h, size_t first, size_t last, bool checkpoint);
  // The two towers, adapted alike (src/model/adapted_tower.h); the image one is the backbone.
  std::unique_ptr<AdaptedTower> image_;
  std::unique_ptr<AdaptedTower> text_;
  bool text_grad_dependent_ = false;  // see has_grad_mode_dependent_kernels
  LoraSettings lora_settings_;
  at::Tensor head_weight_, head_bias_;
  bool normalize_features_ = false;
  bool head_trainable_ = true;
  FrozenQuantization quantization_;
  OffloadSettings offload_settings_;
  c10::intrusive_ptr<BlockOffload> offload_;  // made by to()
  Method method_ = Method::kLora;
  c10::Device device_{c10::kCPU};
  std::vector<torch::jit::Module> blocks_;
  std::vector<std::string> block_paths_;
  std::vector<bool> block_grad_dependent_;  // see has_grad_mode_dependent_kernels
  std::vector<std::vector<at::Tensor>> block_parameters_;  // trainable tensors inside each block
  int64_t prefix_blocks_ = 0;                               // leading blocks with nothing to train
  at::Tensor classify(const at::Tensor& features);
};

}  // namespace loratune
