#include "import/script_builder.h"

#include <ATen/ATen.h>

#include <cmath>
#include <sstream>

#include "common/strings.h"
#include "common/torch_compat.h"
#include "loratune/errors.h"

namespace loratune::importer {
namespace {

std::string shape_text(c10::IntArrayRef shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

}  // namespace

std::string activation_source(Activation a, const std::string& var) {
  switch (a) {
    case Activation::gelu: return "torch.gelu(" + var + ")";
    case Activation::gelu_tanh: return "torch.gelu(" + var + ", approximate='tanh')";
    case Activation::quick_gelu: return var + " * torch.sigmoid(1.702 * " + var + ")";
    case Activation::silu: return "torch.silu(" + var + ")";
  }
  return var;
}

std::string float_literal(double value) {
  std::ostringstream s;
  s.precision(17);
  s << value;
  std::string t = s.str();
  if (t.find_first_of(".e") == std::string::npos) t += ".0";
  return t;
}

CheckpointTensors::CheckpointTensors(std::map<std::string, at::Tensor> tensors, std::string origin)
    : tensors_(std::move(tensors)), origin_(std::move(origin)) {}

at::Tensor CheckpointTensors::take_any(const std::string& key, int64_t dims) {
  auto it = tensors_.find(key);
  if (it == tensors_.end()) throw InputError(origin_ + ": tensor \"" + key + "\" is missing; the checkpoint does not match "
                                             "its config (or is an architecture variant loratune does not import)");
  at::Tensor t = it->second;
  if (t.dim() != dims)
    throw InputError(origin_ + ": tensor \"" + key + "\" has shape " + shape_text(t.sizes()) + ", expected " +
                     std::to_string(dims) + " dimensions");
  if (!t.is_floating_point())
    throw InputError(origin_ + ": tensor \"" + key + "\" has type " + c10::toString(t.scalar_type()) +
                     ", expected a floating-point type (F32, F16 or BF16)");
  tensors_.erase(it);
  return t.to(at::kFloat).contiguous();
}

at::Tensor CheckpointTensors::take(const std::string& key, const std::vector<int64_t>& shape) {
  if (tensors_.count(key) && tensors_.at(key).sizes() != c10::IntArrayRef(shape))
    throw InputError(origin_ + ": tensor \"" + key + "\" has shape " + shape_text(tensors_.at(key).sizes()) +
                     ", the config says " + shape_text(shape));
  return take_any(key, static_cast<int64_t>(shape.size()));
}

std::vector<int64_t> CheckpointTensors::shape(const std::string& key, int64_t dims) const {
  auto it = tensors_.find(key);
  if (it == tensors_.end()) throw InputError(origin_ + ": tensor \"" + key + "\" is missing");
  if (it->second.dim() != dims)
    throw InputError(origin_ + ": tensor \"" + key + "\" has shape " + shape_text(it->second.sizes()) + ", expected " +
                     std::to_string(dims) + " dimensions");
  for (int64_t size : it->second.sizes())
    if (size < 1) throw InputError(origin_ + ": tensor \"" + key + "\" has shape " + shape_text(it->second.sizes()));
  return it->second.sizes().vec();
}

std::vector<std::string> CheckpointTensors::keys_with_prefix(const std::string& prefix) const {
  std::vector<std::string> out;
  for (auto it = tensors_.lower_bound(prefix); it != tensors_.end() && it->first.compare(0, prefix.size(), prefix) == 0; ++it)
    out.push_back(it->first);
  return out;
}

void CheckpointTensors::ignore_if(const std::function<bool(const std::string&)>& unused) {
  for (auto it = tensors_.begin(); it != tensors_.end();) it = unused(it->first) ? tensors_.erase(it) : std::next(it);
}

void CheckpointTensors::expect_all_taken() const {
  if (tensors_.empty()) return;
  std::vector<std::string> names;
  for (const auto& [k, v] : tensors_) names.push_back(k);
  throw InputError(origin_ + ": tensor \"" + names.front() + "\" is not part of the architecture its config describes (" +
                   std::to_string(names.size()) + " such tensors: " + join(names, ", ", 4) +
                   "); the checkpoint and its config do not match");
}

Activation activation_from_name(const std::string& name, const std::string& where) {
  if (name == "gelu") return Activation::gelu;
  if (name == "gelu_new" || name == "gelu_pytorch_tanh" || name == "gelu_tanh" || name == "gelu_fast")
    return Activation::gelu_tanh;
  if (name == "quick_gelu") return Activation::quick_gelu;
  if (name == "silu" || name == "swish") return Activation::silu;
  throw InputError(where + ": activation \"" + name + "\" is not supported (gelu, gelu_new, gelu_pytorch_tanh, "
                   "quick_gelu, silu)");
}

ScriptBuilder::ScriptBuilder() : unit_(std::make_shared<torch::jit::CompilationUnit>()) {}

torch::jit::Module ScriptBuilder::container(const std::string& kind) {
  return torch::jit::Module(c10::QualifiedName("__torch__.loratune.imported." + kind), unit_, /*shouldMangle=*/true);
}

void ScriptBuilder::define(torch::jit::Module& module, const std::string& source) { module.define(source); }

void add_parameter(torch::jit::Module& module, const std::string& name, const at::Tensor& value) {
  module.register_parameter(name, value, /*is_buffer=*/false);
}

torch::jit::Module ScriptBuilder::linear(CheckpointTensors& ckpt, const std::string& key, int64_t out, int64_t in,
                                         Bias bias) {
  torch::jit::Module m = container("Linear");
  add_parameter(m, "weight", ckpt.take(key + ".weight", {out, in}));
  const bool with_bias = bias == Bias::yes || (bias == Bias::optional && ckpt.has(key + ".bias"));
  if (with_bias) {
    add_parameter(m, "bias", ckpt.take(key + ".bias", {out}));
    define(m, "def forward(self, x):\n    return torch.linear(x, self.weight, self.bias)\n");
  } else {
    define(m, "def forward(self, x):\n    return torch.linear(x, self.weight)\n");
  }
  return m;
}

torch::jit::Module ScriptBuilder::layer_norm(CheckpointTensors& ckpt, const std::string& key, int64_t dim, double eps) {
  torch::jit::Module m = container("LayerNorm");
  add_parameter(m, "weight", ckpt.take(key + ".weight", {dim}));
  add_parameter(m, "bias", ckpt.take(key + ".bias", {dim}));
  define(m, "def forward(self, x):\n    return torch.layer_norm(x, [" + std::to_string(dim) +
                "], self.weight, self.bias, " + float_literal(eps) + ")\n");
  return m;
}

torch::jit::Module ScriptBuilder::patch_conv(CheckpointTensors& ckpt, const std::string& key, int64_t dim,
                                             int64_t channels, int64_t patch, Bias bias) {
  torch::jit::Module m = container("Conv2d");
  add_parameter(m, "weight", ckpt.take(key + ".weight", {dim, channels, patch, patch}));
  const bool with_bias = bias == Bias::yes || (bias == Bias::optional && ckpt.has(key + ".bias"));
  const std::string p = std::to_string(patch);
  if (with_bias) add_parameter(m, "bias", ckpt.take(key + ".bias", {dim}));
  define(m, "def forward(self, x):\n    return torch.conv2d(x, self.weight, " + std::string(with_bias ? "self.bias" : "None") +
                ", [" + p + ", " + p + "])\n");
  return m;
}

namespace {

// The module that holds the last part of dotted `path` (containers created on the way), and that last part.
std::pair<torch::jit::Module, std::string> parent_of(ScriptBuilder& builder, torch::jit::Module& root,
                                                     const std::string& path) {
  torch::jit::Module parent = root;
  size_t start = 0;
  for (size_t dot = path.find('.'); dot != std::string::npos; start = dot + 1, dot = path.find('.', start)) {
    const std::string part = path.substr(start, dot - start);
    if (!parent.hasattr(part)) parent.register_module(part, builder.container());
    parent = parent.attr(part).toModule();
  }
  return {parent, path.substr(start)};
}

}  // namespace

void place(ScriptBuilder& builder, torch::jit::Module& root, const std::string& path, const torch::jit::Module& child) {
  auto [parent, name] = parent_of(builder, root, path);
  parent.register_module(name, child);
}

void place_parameter(ScriptBuilder& builder, torch::jit::Module& root, const std::string& path, const at::Tensor& value) {
  auto [parent, name] = parent_of(builder, root, path);
  add_parameter(parent, name, value);
}

torch::jit::Module transformer_block(ScriptBuilder& builder, CheckpointTensors& ckpt, const std::string& key_prefix,
                                     const BlockLayout& l, const BlockShape& s) {
  using Bias = ScriptBuilder::Bias;
  if (s.heads <= 0 || s.dim % s.heads != 0)
    throw InputError(ckpt.origin() + ": " + std::to_string(s.heads) + " attention heads do not divide width " +
                     std::to_string(s.dim));
  const int64_t C = s.dim, H = s.heads, D = C / H;
  const Bias proj_bias = l.qkv_bias ? Bias::yes : Bias::optional;
  torch::jit::Module block = builder.container("Block");
  auto add = [&](const std::string& path, const torch::jit::Module& m) { place(builder, block, path, m); };
  add(l.norm1, builder.layer_norm(ckpt, key_prefix + l.norm1, C, l.eps));

  std::ostringstream src;
  // Layer scale: `var` times the parameter at `path`, when the checkpoint has one.
  auto scale = [&](const std::string& path, const char* var) {
    if (path.empty() || !ckpt.has(key_prefix + path)) return;
    place_parameter(builder, block, path, ckpt.take(key_prefix + path, {C}));
    src << "    " << var << " = " << var << " * self." << path << "\n";
  };
  // q, k and v from the rows [0:C], [C:2C], [2C:3C] of a fused projection.
  auto split_qkv = [&] {
    src << "    qkv = self." << l.qkv << ".forward(h).reshape(B, N, 3, " << H << ", " << D << ").permute(2, 0, 3, 1, 4)\n"
        << "    q = qkv[0]\n    k = qkv[1]\n    v = qkv[2]\n";
  };
  src << "def forward(self, x):\n"
      << "    B = x.size(0)\n    N = x.size(1)\n"
      << "    h = self." << l.norm1 << ".forward(x)\n";
  switch (l.attention) {
    case BlockLayout::Attention::separate:
      for (const auto& [var, path] : {std::pair<const char*, std::string>{"q", l.q}, {"k", l.k}, {"v", l.v}}) {
        add(path, builder.linear(ckpt, key_prefix + path, C, C, proj_bias));
        src << "    " << var << " = self." << path << ".forward(h).reshape(B, N, " << H << ", " << D
            << ").transpose(1, 2)\n";
      }
      break;
    case BlockLayout::Attention::fused:
      add(l.qkv, builder.linear(ckpt, key_prefix + l.qkv, 3 * C, C, proj_bias));
      split_qkv();
      break;
    case BlockLayout::Attention::in_proj: {
      torch::jit::Module attn = builder.container("MultiheadAttention");
      add_parameter(attn, "in_proj_weight", ckpt.take(key_prefix + l.qkv + ".in_proj_weight", {3 * C, C}));
      add_parameter(attn, "in_proj_bias", ckpt.take(key_prefix + l.qkv + ".in_proj_bias", {3 * C}));
      builder.define(attn, "def forward(self, x):\n    return torch.linear(x, self.in_proj_weight, self.in_proj_bias)\n");
      add(l.qkv, attn);
      split_qkv();
      break;
    }
  }
  if (!l.q_norm.empty() && ckpt.has(key_prefix + l.q_norm + ".weight")) {
    add(l.q_norm, builder.layer_norm(ckpt, key_prefix + l.q_norm, D, l.eps));
    add(l.k_norm, builder.layer_norm(ckpt, key_prefix + l.k_norm, D, l.eps));
    src << "    q = self." << l.q_norm << ".forward(q)\n    k = self." << l.k_norm << ".forward(k)\n";
  }
#if LORATUNE_TORCH_HAS_SDPA
  src << "    a = torch.scaled_dot_product_attention(q, k, v, None, 0.0, " << (l.causal ? "True" : "False") << ")\n";
#else
  src << "    s = torch.matmul(q, k.transpose(-2, -1)) * " << float_literal(1.0 / std::sqrt(static_cast<double>(D))) << "\n";
  if (l.causal)
    src << "    s = s + torch.triu(torch.full([N, N], float('-inf'), dtype=s.dtype, device=s.device), 1)\n";
  src << "    a = torch.matmul(torch.softmax(s, -1), v)\n";
#endif
  add(l.out, builder.linear(ckpt, key_prefix + l.out, C, C, Bias::optional));
  src << "    a = self." << l.out << ".forward(a.transpose(1, 2).reshape(B, N, " << C << "))\n";
  scale(l.scale1, "a");
  src << "    x = x + a\n";
  add(l.norm2, builder.layer_norm(ckpt, key_prefix + l.norm2, C, l.eps));
  src << "    h = self." << l.norm2 << ".forward(x)\n";
  if (l.swiglu) {
    add(l.fc1, builder.linear(ckpt, key_prefix + l.fc1, 2 * s.mlp_hidden, C, Bias::optional));
    src << "    gv = self." << l.fc1 << ".forward(h).chunk(2, -1)\n"
        << "    h = " << activation_source(l.activation, "gv[0]") << " * gv[1]\n";
  } else {
    add(l.fc1, builder.linear(ckpt, key_prefix + l.fc1, s.mlp_hidden, C, Bias::optional));
    src << "    h = self." << l.fc1 << ".forward(h)\n"
        << "    h = " << activation_source(l.activation, "h") << "\n";
  }
  add(l.fc2, builder.linear(ckpt, key_prefix + l.fc2, C, s.mlp_hidden, Bias::optional));
  src << "    h = self." << l.fc2 << ".forward(h)\n";
  scale(l.scale2, "h");
  src << "    return x + h\n";
  builder.define(block, src.str());
  return block;
}

std::string run_blocks_source(const std::string& list_path, int64_t count, const std::string& var) {
  std::string out;
  for (int64_t i = 0; i < count; ++i)
    out += "    " + var + " = getattr(" + list_path + ", '" + std::to_string(i) + "').forward(" + var + ")\n";
  return out;
}

at::Tensor resample_position_table(const at::Tensor& table, int64_t prefix, int64_t old_h, int64_t old_w,
                                   int64_t new_h, int64_t new_w) {
  if (old_h == new_h && old_w == new_w) return table;
  const int64_t dim = table.size(-1);
  at::Tensor grid = table.narrow(1, prefix, old_h * old_w).reshape({1, old_h, old_w, dim}).permute({0, 3, 1, 2});
  grid = at::_upsample_bicubic2d_aa(grid.contiguous(), {new_h, new_w}, /*align_corners=*/false);
  grid = grid.permute({0, 2, 3, 1}).reshape({1, new_h * new_w, dim});
  return at::cat({table.narrow(1, 0, prefix), grid}, 1).contiguous();
}

}  // namespace loratune::importer
