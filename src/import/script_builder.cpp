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

namespace {

// A block being built: its modules come from the checkpoint under `key_prefix`, its forward is written into `src`.
struct BlockBuild {
  ScriptBuilder& builder;
  CheckpointTensors& ckpt;
  const std::string& key_prefix;
  const BlockLayout& l;
  torch::jit::Module block;
  std::ostringstream src;

  void add(const std::string& path, const torch::jit::Module& m) { place(builder, block, path, m); }
  torch::jit::Module linear(const std::string& path, int64_t out, int64_t in, ScriptBuilder::Bias bias) {
    torch::jit::Module m = builder.linear(ckpt, key_prefix + path, out, in, bias);
    add(path, m);
    return m;
  }
  void layer_norm(const std::string& path, int64_t width) { add(path, builder.layer_norm(ckpt, key_prefix + path, width, l.eps)); }
  // Layer scale: `var` times the parameter at `path`, when the checkpoint has one.
  void scale(const std::string& path, const char* var, int64_t C) {
    if (path.empty() || !ckpt.has(key_prefix + path)) return;
    place_parameter(builder, block, path, ckpt.take(key_prefix + path, {C}));
    src << "    " << var << " = " << var << " * self." << path << "\n";
  }
};

// q, k and v [B, H, N, D] from h, by the block's projection layout.
void attention_inputs(BlockBuild& b, int64_t C, int64_t H, int64_t D) {
  const BlockLayout& l = b.l;
  const auto proj_bias = l.qkv_bias ? ScriptBuilder::Bias::yes : ScriptBuilder::Bias::optional;
  // q, k and v from the rows [0:C], [C:2C], [2C:3C] of a fused projection.
  auto split_qkv = [&] {
    b.src << "    qkv = self." << l.qkv << ".forward(h).reshape(B, N, 3, " << H << ", " << D << ").permute(2, 0, 3, 1, 4)\n"
          << "    q = qkv[0]\n    k = qkv[1]\n    v = qkv[2]\n";
  };
  switch (l.attention) {
    case BlockLayout::Attention::separate:
      for (const auto& [var, path] : {std::pair<const char*, std::string>{"q", l.q}, {"k", l.k}, {"v", l.v}}) {
        b.linear(path, C, C, proj_bias);
        b.src << "    " << var << " = self." << path << ".forward(h).reshape(B, N, " << H << ", " << D
              << ").transpose(1, 2)\n";
      }
      break;
    case BlockLayout::Attention::fused:
      b.linear(l.qkv, 3 * C, C, proj_bias);
      split_qkv();
      break;
    case BlockLayout::Attention::in_proj: {
      torch::jit::Module attn = b.builder.container("MultiheadAttention");
      add_parameter(attn, "in_proj_weight", b.ckpt.take(b.key_prefix + l.qkv + ".in_proj_weight", {3 * C, C}));
      add_parameter(attn, "in_proj_bias", b.ckpt.take(b.key_prefix + l.qkv + ".in_proj_bias", {3 * C}));
      b.builder.define(attn, "def forward(self, x):\n    return torch.linear(x, self.in_proj_weight, self.in_proj_bias)\n");
      b.add(l.qkv, attn);
      split_qkv();
      break;
    }
  }
  if (!l.q_norm.empty() && b.ckpt.has(b.key_prefix + l.q_norm + ".weight")) {
    b.layer_norm(l.q_norm, D);
    b.layer_norm(l.k_norm, D);
    b.src << "    q = self." << l.q_norm << ".forward(q)\n    k = self." << l.k_norm << ".forward(k)\n";
  }
}

// a = softmax(q k^T / sqrt(D)) v, causal where the layout says.
std::string attention_source(bool causal, int64_t D) {
  std::ostringstream src;
#if LORATUNE_TORCH_HAS_SDPA
  (void)D;
  src << "    a = torch.scaled_dot_product_attention(q, k, v, None, 0.0, " << (causal ? "True" : "False") << ")\n";
#else
  src << "    s = torch.matmul(q, k.transpose(-2, -1)) * " << float_literal(1.0 / std::sqrt(static_cast<double>(D))) << "\n";
  if (causal) src << "    s = s + torch.triu(torch.full([N, N], float('-inf'), dtype=s.dtype, device=s.device), 1)\n";
  src << "    a = torch.matmul(torch.softmax(s, -1), v)\n";
#endif
  return src.str();
}

// h = fc2(act(fc1(h))), or fc2(act(gate) * value) for SwiGLU.
void mlp(BlockBuild& b, int64_t C, int64_t hidden) {
  const BlockLayout& l = b.l;
  using Bias = ScriptBuilder::Bias;
  if (l.swiglu) {
    b.linear(l.fc1, 2 * hidden, C, Bias::optional);
    b.src << "    gv = self." << l.fc1 << ".forward(h).chunk(2, -1)\n"
          << "    h = " << activation_source(l.activation, "gv[0]") << " * gv[1]\n";
  } else {
    b.linear(l.fc1, hidden, C, Bias::optional);
    b.src << "    h = self." << l.fc1 << ".forward(h)\n"
          << "    h = " << activation_source(l.activation, "h") << "\n";
  }
  b.linear(l.fc2, C, hidden, Bias::optional);
  b.src << "    h = self." << l.fc2 << ".forward(h)\n";
}

}  // namespace

torch::jit::Module transformer_block(ScriptBuilder& builder, CheckpointTensors& ckpt, const std::string& key_prefix,
                                     const BlockLayout& l, const BlockShape& s) {
  if (s.heads <= 0 || s.dim % s.heads != 0)
    throw InputError(ckpt.origin() + ": " + std::to_string(s.heads) + " attention heads do not divide width " +
                     std::to_string(s.dim));
  const int64_t C = s.dim, H = s.heads, D = C / H;
  BlockBuild b{builder, ckpt, key_prefix, l, builder.container("Block"), {}};
  b.layer_norm(l.norm1, C);
  b.src << "def forward(self, x):\n"
        << "    B = x.size(0)\n    N = x.size(1)\n"
        << "    h = self." << l.norm1 << ".forward(x)\n";
  attention_inputs(b, C, H, D);
  b.src << attention_source(l.causal, D);
  b.linear(l.out, C, C, ScriptBuilder::Bias::optional);
  b.src << "    a = self." << l.out << ".forward(a.transpose(1, 2).reshape(B, N, " << C << "))\n";
  b.scale(l.scale1, "a", C);
  b.src << "    x = x + a\n";
  b.layer_norm(l.norm2, C);
  b.src << "    h = self." << l.norm2 << ".forward(x)\n";
  mlp(b, C, s.mlp_hidden);
  b.scale(l.scale2, "h", C);
  b.src << "    return x + h\n";
  builder.define(b.block, b.src.str());
  return b.block;
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
