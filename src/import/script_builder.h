// Building TorchScript modules from checkpoint tensors, without Python: each module gets its own class type and its
// methods are TorchScript source compiled by LibTorch. Linear layers call aten::linear in their own forward, so the
// adapter rewrite (src/lora/adapter_host.cpp) treats them as it treats exported models.
#pragma once

#include <torch/script.h>

#include <functional>
#include <map>
#include <set>
#include <string>
#include <vector>

namespace loratune::importer {

// The tensors of a checkpoint, handed out once each as float32 with their shapes checked. What no builder takes
// and no rule ignores is an error: a checkpoint with tensors the architecture does not have is not that architecture.
class CheckpointTensors {
 public:
  CheckpointTensors(std::map<std::string, at::Tensor> tensors, std::string origin);

  bool has(const std::string& key) const { return tensors_.count(key) > 0; }
  // The tensor under `key`, as float32; InputError naming the key when it is missing or its shape differs.
  at::Tensor take(const std::string& key, const std::vector<int64_t>& shape);
  // As take(), with any shape of `dims` dimensions (sizes then read from it).
  at::Tensor take_any(const std::string& key, int64_t dims);
  // The shape of a tensor still present, of `dims` dimensions each at least 1 (InputError naming the key when
  // absent or of another shape).
  std::vector<int64_t> shape(const std::string& key, int64_t dims) const;
  // Keys still present with this prefix.
  std::vector<std::string> keys_with_prefix(const std::string& prefix) const;
  // Tensors the model does not use (a classifier, a pooler, the other tower): dropped without error.
  void ignore_if(const std::function<bool(const std::string&)>& unused);
  // InputError naming the first tensor that was neither taken nor ignored.
  void expect_all_taken() const;
  const std::string& origin() const { return origin_; }

 private:
  std::map<std::string, at::Tensor> tensors_;
  std::string origin_;
};

// Source text of the activation functions a config can name.
enum class Activation { gelu, gelu_tanh, quick_gelu, silu };
Activation activation_from_name(const std::string& name, const std::string& where);
// TorchScript source applying `a` to the variable `var`.
std::string activation_source(Activation a, const std::string& var);

class ScriptBuilder {
 public:
  ScriptBuilder();

  // A module with no methods (a container such as "encoder", or one holding parameters only).
  torch::jit::Module container(const std::string& kind = "Module");
  // Linear layer `key`.weight [out, in] (+ `key`.bias [out] when `bias` says so, or when present if optional).
  enum class Bias { yes, no, optional };
  torch::jit::Module linear(CheckpointTensors& ckpt, const std::string& key, int64_t out, int64_t in, Bias bias);
  torch::jit::Module layer_norm(CheckpointTensors& ckpt, const std::string& key, int64_t dim, double eps);
  // Conv2d over non-overlapping patches: `key`.weight [dim, channels, patch, patch], stride = patch.
  torch::jit::Module patch_conv(CheckpointTensors& ckpt, const std::string& key, int64_t dim, int64_t channels,
                                int64_t patch, Bias bias);
  // A module whose forward is `source` (TorchScript, with `self` and the module's registered members).
  void define(torch::jit::Module& module, const std::string& source);

 private:
  std::shared_ptr<torch::jit::CompilationUnit> unit_;
};

// Registers `child` at dotted `path` below `root`, creating containers for missing intermediate modules.
void place(ScriptBuilder& builder, torch::jit::Module& root, const std::string& path, const torch::jit::Module& child);
// Registers a frozen float parameter `name` on `module`.
void add_parameter(torch::jit::Module& module, const std::string& name, const at::Tensor& value);
// Registers the parameter at dotted `path` ("token_embedding.weight"), creating containers on the way.
void place_parameter(ScriptBuilder& builder, torch::jit::Module& root, const std::string& path, const at::Tensor& value);

// A double as a TorchScript float literal, exactly ("1e-06", "0.125", "3.0").
std::string float_literal(double value);

// One pre-norm transformer block as the three families write it. Paths are relative to the block, keys relative to
// the block's checkpoint prefix; both use the original model's names, so adapter keys stay PEFT's.
struct BlockLayout {
  enum class Attention { separate, fused, in_proj };
  std::string norm1, norm2;
  Attention attention = Attention::separate;
  std::string q, k, v;      // separate: three Linear layers
  std::string qkv;          // fused: one Linear [3C, C]; in_proj: the module owning in_proj_weight/in_proj_bias
  std::string q_norm, k_norm;  // LayerNorm over each head's q and k (optional)
  std::string out;          // output projection
  std::string scale1, scale2;  // layer-scale parameters ("ls1.gamma"; optional)
  std::string fc1, fc2;     // MLP; with `swiglu`, fc1 is [2H, C] split into gate and value halves
  bool swiglu = false;
  Activation activation = Activation::gelu;
  double eps = 1e-6;
  bool causal = false;
  bool qkv_bias = true;     // separate and fused projections; optional when absent in the checkpoint
};

struct BlockShape {
  int64_t dim = 0, heads = 0, mlp_hidden = 0;
};

// Builds one block from the tensors under `key_prefix` ("vit.encoder.layer.3.") and defines its forward.
torch::jit::Module transformer_block(ScriptBuilder& builder, CheckpointTensors& ckpt, const std::string& key_prefix,
                                     const BlockLayout& layout, const BlockShape& shape);

// TorchScript lines that run every block of the list at `list_path` (e.g. "self.vit.encoder.layer") on `var`.
std::string run_blocks_source(const std::string& list_path, int64_t count, const std::string& var);

// Bicubic (antialiased) resampling of a [1, prefix + h*w, D] position table to a grid of new_h x new_w, the
// prefix rows kept (timm's resample_abs_pos_embed).
at::Tensor resample_position_table(const at::Tensor& table, int64_t prefix, int64_t old_h, int64_t old_w,
                                   int64_t new_h, int64_t new_w);

}  // namespace loratune::importer
