// timm VisionTransformer checkpoints (config.json with "architecture" and "pretrained_cfg", as timm's save_for_hf
// and the hub write them). As timm does, the model is built from the architecture's definition (its keyword
// arguments, from timm_architectures.inc) with config.json's "model_args" over them; the tensors must then be those
// of that model. Names timm defines elsewhere, or VisionTransformers with parts loratune does not build, are refused
// by name. Module paths are model.blocks.N.attn.qkv (module_prefix "model."), as scripts/export/timm_vit.py writes.
#include <cmath>

#include "common/strings.h"
#include "import/families.h"
#include "import/timm_architectures.h"
#include "loratune/errors.h"

using nlohmann::json;

namespace loratune::importer {
namespace {

using Bias = ScriptBuilder::Bias;

// A VisionTransformer's keyword arguments, read as timm's VisionTransformer.__init__ reads them (its defaults).
struct TimmVit {
  int64_t patch = 16, channels = 3, dim = 768, depth = 12, heads = 12, registers = 0;
  double mlp_ratio = 4.0, eps = 1e-6;
  Activation activation = Activation::gelu;
  std::string pool = "token";
  bool class_token = true, no_embed_class = false, pre_norm = false, final_norm = true, fc_norm = false;
  bool qkv_bias = true, qk_norm = false, layer_scale = false, distilled = false;
  int64_t mlp_hidden() const { return static_cast<int64_t>(static_cast<double>(dim) * mlp_ratio); }
  int64_t prefix() const { return (class_token ? 1 : 0) + (distilled ? 1 : 0) + registers; }
};

// The parts of timm's VisionTransformer the builder does not make, in words; empty when it makes them all.
std::vector<std::string> unsupported_parts(const json& a) {
  std::vector<std::string> parts;
  auto layer = [&](const char* key) { return a.contains(key) && a[key].is_string() ? to_lower(a[key].get<std::string>()) : ""; };
  auto set = [&](const char* key) { return a.contains(key) && !a[key].is_null() && a[key] != false && a[key] != ""; };
  if (const std::string n = layer("norm_layer"); set("norm_layer") && n != "layernorm")
    parts.push_back(n == "rmsnorm" ? "RMSNorm" : "norm_layer " + n);
  if (set("embed_norm_layer")) parts.push_back("a normalised patch embedding (embed_norm_layer)");
  if (const std::string m = layer("mlp_layer"); set("mlp_layer") && m != "mlp")
    parts.push_back(m.find("glu") != std::string::npos ? "a SwiGLU MLP" : "mlp_layer " + m);
  if (const std::string b = layer("block_fn"); set("block_fn") && b != "block") parts.push_back(b + " blocks");
  if (const std::string at = layer("attn_layer"); set("attn_layer") && at != "attention")
    parts.push_back(at == "diff" ? "differential attention" : "attn_layer " + at);
  if (set("embed_layer") && layer("embed_layer") != "patchembed") parts.push_back("embed_layer " + layer("embed_layer"));
  if (set("scale_attn_norm") || set("scale_mlp_norm"))
    parts.push_back("norms inside attention and MLP (scale_attn_norm, scale_mlp_norm)");
  if (a.contains("pos_embed") && a["pos_embed"] != "learn") parts.push_back("no learned position embedding");
  if (set("pool_include_prefix")) parts.push_back("pooling over the prefix tokens (pool_include_prefix)");
  if (set("dynamic_img_pad")) parts.push_back("padded patches (dynamic_img_pad)");
  if (a.contains("global_pool")) {
    const std::string pool = a["global_pool"].is_string() ? a["global_pool"].get<std::string>() : a["global_pool"].dump();
    if (pool != "token" && pool != "avg" && pool != "map") parts.push_back("global_pool \"" + printable(pool) + "\"");
  }
  if (const std::string act = layer("act_layer"); set("act_layer") && act != "gelu" && act != "gelu_tanh" &&
                                                  act != "quick_gelu" && act != "silu" && act != "swish")
    parts.push_back("activation " + act);
  return parts;
}

int64_t size_arg(const json& a, const char* key, int64_t fallback, const std::string& where) {
  if (!a.contains(key)) return fallback;
  json v = a[key];
  if (v.is_array() && v.size() == 2 && v[0] == v[1]) v = v[0];  // (16, 16)
  if (!v.is_number_integer() || v.get<int64_t>() < 1 || v.get<int64_t>() > (int64_t{1} << 20))
    throw InputError(where + ": model_args." + key + " must be a positive integer, not " + printable(a[key].dump()));
  return v.get<int64_t>();
}

bool flag_arg(const json& a, const char* key, bool fallback, const std::string& where) {
  if (!a.contains(key) || a[key].is_null()) return fallback;
  if (!a[key].is_boolean()) throw InputError(where + ": model_args." + key + " must be true or false");
  return a[key].get<bool>();
}

// The architecture `arch` ("vit_base_patch16_224.augreg_in21k") as timm builds it for this config.json.
TimmVit timm_vit(const std::string& arch, const json& config, const std::string& where) {
  const std::string name = arch.substr(0, arch.find('.'));
  const std::string supported = "supported: timm VisionTransformers (vit_*, deit*, flexivit_*, ...) with LayerNorm, "
                                "a GELU / QuickGELU / SiLU MLP, learned positions and token, avg or map pooling";
  std::optional<TimmVisionTransformerArgs> definition = timm_vision_transformer(name);
  if (!definition) {
    if (const std::optional<std::string> other = timm_other_architecture(name))
      throw InputError(where + ": " + printable(name) + " is " + *other + ": not supported; " + supported);
    throw InputError(where + ": \"" + printable(name) + "\" is not an architecture timm " + timm_table_version() +
                     " defines (loratune knows its definitions, not later ones): not imported; " + supported);
  }
  json a = definition->args;
  if (config.contains("model_args")) {
    if (!config["model_args"].is_object()) throw InputError(where + ": \"model_args\" must be an object");
    for (const auto& [key, value] : config["model_args"].items()) a[key] = value;
  }
  if (const std::vector<std::string> parts = unsupported_parts(a); !parts.empty())
    throw InputError(where + ": " + printable(name) + " is a timm VisionTransformer with " + join(parts) +
                     ": not supported; " + supported);

  TimmVit v;
  v.distilled = definition->distilled;
  v.patch = size_arg(a, "patch_size", v.patch, where), v.channels = size_arg(a, "in_chans", v.channels, where);
  v.dim = size_arg(a, "embed_dim", v.dim, where), v.depth = size_arg(a, "depth", v.depth, where);
  if (v.depth > kMaxImportedLayers)
    throw InputError(where + ": model_args.depth must be at most " + std::to_string(kMaxImportedLayers));
  v.heads = size_arg(a, "num_heads", v.heads, where);
  if (v.dim % v.heads != 0)
    throw InputError(where + ": " + std::to_string(v.heads) + " heads (num_heads) do not divide embed_dim " +
                     std::to_string(v.dim));
  if (a.contains("reg_tokens")) v.registers = a["reg_tokens"] == 0 ? 0 : size_arg(a, "reg_tokens", 0, where);
  if (a.contains("mlp_ratio")) {
    if (!a["mlp_ratio"].is_number() || !(a["mlp_ratio"].get<double>() > 0 && a["mlp_ratio"].get<double>() <= 64))
      throw InputError(where + ": model_args.mlp_ratio must be a number in (0, 64]");
    v.mlp_ratio = a["mlp_ratio"].get<double>();
  }
  if (a.contains("norm_eps")) {
    if (!a["norm_eps"].is_number() || !(a["norm_eps"].get<double>() > 0 && a["norm_eps"].get<double>() < 1))
      throw InputError(where + ": norm eps must be a number in (0, 1)");
    v.eps = a["norm_eps"].get<double>();
  }
  if (a.contains("act_layer") && a["act_layer"].is_string())
    v.activation = activation_from_name(to_lower(a["act_layer"].get<std::string>()), where);
  if (a.contains("global_pool")) v.pool = a["global_pool"].get<std::string>();
  v.class_token = flag_arg(a, "class_token", v.class_token, where);
  v.no_embed_class = flag_arg(a, "no_embed_class", v.no_embed_class, where);
  v.pre_norm = flag_arg(a, "pre_norm", v.pre_norm, where);
  v.final_norm = flag_arg(a, "final_norm", v.final_norm, where);
  v.fc_norm = flag_arg(a, "fc_norm", v.pool == "avg", where);  // timm: None means "with average pooling"
  v.qkv_bias = flag_arg(a, "qkv_bias", v.qkv_bias, where);
  v.qk_norm = flag_arg(a, "qk_norm", v.qk_norm, where);
  v.layer_scale = a.contains("init_values") && !a["init_values"].is_null();
  if (v.pool == "token" && !v.class_token)
    throw InputError(where + ": global_pool \"token\" needs a class token (class_token is false)");
  return v;
}

// The attention-pooling head ("map"): a learned latent query attends over the tokens, then an MLP with a residual.
std::string attention_pool_source(ScriptBuilder& b, torch::jit::Module& root, CheckpointTensors& ckpt,
                                  const TimmVit& v) {
  const int64_t C = v.dim, H = v.heads, D = C / H;
  const at::Tensor latent = ckpt.take_any("attn_pool.latent", 3);
  if (latent.size(0) != 1 || latent.size(1) < 1 || latent.size(2) != C)
    throw InputError(ckpt.origin() + ": tensor \"attn_pool.latent\" must have shape [1, L, " + std::to_string(C) + "]");
  const int64_t L = latent.size(1);
  place(b, root, "model.attn_pool.q", b.linear(ckpt, "attn_pool.q", C, C, Bias::yes));
  place(b, root, "model.attn_pool.kv", b.linear(ckpt, "attn_pool.kv", 2 * C, C, Bias::yes));
  place(b, root, "model.attn_pool.proj", b.linear(ckpt, "attn_pool.proj", C, C, Bias::yes));
  place(b, root, "model.attn_pool.norm", b.layer_norm(ckpt, "attn_pool.norm", C, v.eps));
  place(b, root, "model.attn_pool.mlp.fc1", b.linear(ckpt, "attn_pool.mlp.fc1", v.mlp_hidden(), C, Bias::yes));
  place(b, root, "model.attn_pool.mlp.fc2", b.linear(ckpt, "attn_pool.mlp.fc2", C, v.mlp_hidden(), Bias::yes));
  torch::jit::Module pool = root.attr("model").toModule().attr("attn_pool").toModule();
  add_parameter(pool, "latent", latent);
  const std::string Ls = std::to_string(L), Hs = std::to_string(H), Ds = std::to_string(D), Cs = std::to_string(C);
  return "    p = self.model.attn_pool\n"
         "    B = h.size(0)\n    N = h.size(1)\n"
         "    q = p.q.forward(p.latent.expand(B, -1, -1)).reshape(B, " + Ls + ", " + Hs + ", " + Ds + ").transpose(1, 2)\n"
         "    kv = p.kv.forward(h).reshape(B, N, 2, " + Hs + ", " + Ds + ").permute(2, 0, 3, 1, 4)\n"
         "    s = torch.matmul(q, kv[0].transpose(-2, -1)) * " + float_literal(1.0 / std::sqrt(static_cast<double>(D))) + "\n"
         "    a = torch.matmul(torch.softmax(s, -1), kv[1]).transpose(1, 2).reshape(B, " + Ls + ", " + Cs + ")\n"
         "    a = p.proj.forward(a)\n"
         "    m = p.mlp.fc1.forward(p.norm.forward(a))\n"
         "    m = " + activation_source(v.activation, "m") + "\n"
         "    h = (a + p.mlp.fc2.forward(m))[:, 0]\n";
}

// Present exactly when the architecture has it: a tensor of the other kind means the file is not that model.
void expect_tensor(const CheckpointTensors& ckpt, const std::string& key, bool expected, const std::string& arch) {
  if (ckpt.has(key) == expected) return;
  throw InputError(ckpt.origin() + ": tensor \"" + key + "\" is " + (expected ? "missing" : "present") + ", but " +
                   printable(arch) + " (with config.json's model_args) " + (expected ? "has" : "has no") +
                   " such tensor; the checkpoint does not match its config");
}

// The tensors the architecture (with model_args) has, and only those.
void expect_architecture_tensors(const CheckpointTensors& ckpt, const TimmVit& v, const std::string& arch) {
  expect_tensor(ckpt, "cls_token", v.class_token, arch);
  expect_tensor(ckpt, "dist_token", v.distilled, arch);
  expect_tensor(ckpt, "reg_token", v.registers > 0, arch);
  expect_tensor(ckpt, "norm_pre.weight", v.pre_norm, arch);
  expect_tensor(ckpt, "norm.weight", v.final_norm && !v.fc_norm, arch);
  expect_tensor(ckpt, "fc_norm.weight", v.final_norm && v.fc_norm, arch);
  expect_tensor(ckpt, "attn_pool.latent", v.pool == "map", arch);
  expect_tensor(ckpt, "blocks.0.ls1.gamma", v.layer_scale && v.depth > 0, arch);
  expect_tensor(ckpt, "blocks.0.attn.q_norm.weight", v.qk_norm && v.depth > 0, arch);
}

// config.json's pretrained_cfg: input size (or --image-size), crop, interpolation, mean and std.
Preprocessing timm_preprocessing(const json& config, const TimmVit& v, const ImportOptions& options,
                                 const std::string& where) {
  const json cfg = config.value("pretrained_cfg", json::object());
  if (!cfg.is_object()) throw InputError(where + ": \"pretrained_cfg\" is not an object");
  Preprocessing pre;
  int64_t trained_size = 224;
  if (cfg.contains("input_size")) {
    const json& in = cfg["input_size"];
    if (!in.is_array() || in.size() != 3 || !in[2].is_number_integer() || in[2].get<int64_t>() < 1 ||
        in[2].get<int64_t>() > kMaxBundleImageSize)
      throw InputError(where + ": pretrained_cfg.input_size must be [channels, height, width], sizes from 1 to " +
                       std::to_string(kMaxBundleImageSize));
    trained_size = in[2].get<int64_t>();
  }
  pre.image_size = options.image_size > 0 ? options.image_size : trained_size;
  const double crop_pct = config_number(cfg, "crop_pct", where, 0.875);
  if (!(crop_pct > 0.05 && crop_pct <= 1.0)) throw InputError(where + ": pretrained_cfg.crop_pct must be in (0.05, 1]");
  pre.resize_size = static_cast<int64_t>(std::floor(static_cast<double>(pre.image_size) / crop_pct));
  pre.interpolation = config_string(cfg, "interpolation", where, "bicubic");
  pre.mean = {0.485f, 0.456f, 0.406f}, pre.std = {0.229f, 0.224f, 0.225f};
  for (auto [key, target] : {std::pair<const char*, std::array<float, 3>*>{"mean", &pre.mean}, {"std", &pre.std}})
    if (cfg.contains(key)) {
      try {
        *target = cfg[key].get<std::array<float, 3>>();
      } catch (const json::exception&) {
        throw InputError(where + ": pretrained_cfg." + key + " must be three numbers");
      }
    }
  if (pre.image_size % v.patch != 0)
    throw InputError(where + ": image size " + std::to_string(pre.image_size) + " is not a multiple of patch " +
                     std::to_string(v.patch));
  return pre;
}

// pos_embed, checked to be a square grid after its prefix rows and resampled to `grid` x `grid`.
at::Tensor position_table(CheckpointTensors& ckpt, const TimmVit& v, int64_t grid) {
  const int64_t C = v.dim, pos_prefix = v.no_embed_class ? 0 : v.prefix();
  const at::Tensor pos_embed = ckpt.take_any("pos_embed", 3);
  const int64_t table = pos_embed.size(1);
  const auto old_grid = static_cast<int64_t>(std::llround(std::sqrt(static_cast<double>(std::max<int64_t>(table - pos_prefix, 0)))));
  if (pos_embed.size(0) != 1 || pos_embed.size(2) != C || old_grid < 1 || old_grid * old_grid != table - pos_prefix)
    throw InputError(ckpt.origin() + ": tensor \"pos_embed\" of shape [" + std::to_string(pos_embed.size(0)) + ", " +
                     std::to_string(table) + ", " + std::to_string(pos_embed.size(2)) + "] is not a square grid of " +
                     "width " + std::to_string(C) + " after " + std::to_string(pos_prefix) + " prefix rows");
  return resample_position_table(pos_embed, pos_prefix, old_grid, old_grid, grid, grid);
}

// TorchScript of the stem: patches, prefix tokens (class, distillation, registers), positions, pre-norm.
std::string stem_source(const TimmVit& v) {
  std::string tokens = "[";
  if (v.class_token) tokens += "self.model.cls_token.expand(B, -1, -1), ";
  if (v.distilled) tokens += "self.model.dist_token.expand(B, -1, -1), ";
  if (v.registers) tokens += "self.model.reg_token.expand(B, -1, -1), ";
  std::string stem = "def stem(self, images):\n"
                     "    x = self.model.patch_embed.proj.forward(images).flatten(2).transpose(1, 2)\n"
                     "    B = x.size(0)\n";
  if (v.no_embed_class) stem += "    x = x + self.model.pos_embed\n";
  if (v.prefix()) stem += "    x = torch.cat(" + tokens + "x], 1)\n";
  if (!v.no_embed_class) stem += "    x = x + self.model.pos_embed\n";
  if (v.pre_norm) stem += "    x = self.model.norm_pre.forward(x)\n";
  return stem + "    return x\n";
}

// TorchScript of the head: final norm, pooling (token, average, distilled pair, attention pool), fc_norm.
std::string head_source(ScriptBuilder& b, torch::jit::Module& root, CheckpointTensors& ckpt, const TimmVit& v) {
  const bool use_fc_norm = v.final_norm && v.fc_norm, use_norm = v.final_norm && !v.fc_norm;
  const std::string prefix = std::to_string(v.prefix());
  std::string head = "def head(self, hidden):\n    h = hidden\n";
  if (use_norm) head += "    h = self.model.norm.forward(h)\n";
  if (v.pool == "map") head += "    h = h[:, " + prefix + ":]\n" + attention_pool_source(b, root, ckpt, v);
  else if (v.distilled) head += "    h = (h[:, 0] + h[:, 1]) * 0.5\n";
  else if (v.pool == "token") head += "    h = h[:, 0]\n";
  else head += "    h = h[:, " + prefix + ":].mean(1)\n";
  if (use_fc_norm) head += "    h = self.model.fc_norm.forward(h)\n";
  return head + "    return h\n";
}

}  // namespace

ImportedModel import_timm(const Folder& folder, const json& config, const ImportOptions& options) {
  const std::string where = folder.where("config.json");
  const std::string arch = config_string(config, "architecture", where);
  const TimmVit v = timm_vit(arch, config, where);
  CheckpointTensors ckpt = read_weights(folder, "model", "pytorch_model.bin");
  ckpt.ignore_if([](const std::string& k) { return k.rfind("head.", 0) == 0 || k.rfind("head_dist.", 0) == 0; });
  expect_architecture_tensors(ckpt, v, arch);
  const Preprocessing pre = timm_preprocessing(config, v, options, where);
  const at::Tensor pos_embed = position_table(ckpt, v, pre.image_size / v.patch);

  BlockLayout l;
  l.norm1 = "norm1", l.norm2 = "norm2", l.attention = BlockLayout::Attention::fused, l.qkv = "attn.qkv";
  l.q_norm = "attn.q_norm", l.k_norm = "attn.k_norm", l.out = "attn.proj", l.scale1 = "ls1.gamma", l.scale2 = "ls2.gamma";
  l.fc1 = "mlp.fc1", l.fc2 = "mlp.fc2", l.qkv_bias = v.qkv_bias, l.eps = v.eps, l.activation = v.activation;
  const int64_t C = v.dim;
  const BlockShape shape{C, v.heads, v.mlp_hidden()};

  ScriptBuilder b;
  torch::jit::Module root = b.container("ImportedTimmViT");
  place(b, root, "model.patch_embed.proj", b.patch_conv(ckpt, "patch_embed.proj", C, v.channels, v.patch, Bias::optional));
  torch::jit::Module model = root.attr("model").toModule();
  if (v.class_token) add_parameter(model, "cls_token", ckpt.take("cls_token", {1, 1, C}));
  if (v.registers) add_parameter(model, "reg_token", ckpt.take("reg_token", {1, v.registers, C}));
  if (v.distilled) add_parameter(model, "dist_token", ckpt.take("dist_token", {1, 1, C}));
  add_parameter(model, "pos_embed", pos_embed);
  if (v.pre_norm) place(b, root, "model.norm_pre", b.layer_norm(ckpt, "norm_pre", C, l.eps));
  for (int64_t i = 0; i < v.depth; ++i)
    place(b, root, "model.blocks." + std::to_string(i),
          transformer_block(b, ckpt, "blocks." + std::to_string(i) + ".", l, shape));
  if (v.final_norm && !v.fc_norm) place(b, root, "model.norm", b.layer_norm(ckpt, "norm", C, l.eps));
  if (v.final_norm && v.fc_norm) place(b, root, "model.fc_norm", b.layer_norm(ckpt, "fc_norm", C, l.eps));
  const std::string head = head_source(b, root, ckpt, v);
  ckpt.expect_all_taken();
  b.define(root, stem_source(v));
  b.define(root, head);
  b.define(root, "def forward(self, images):\n    h = self.stem(images)\n" +
                     run_blocks_source("self.model.blocks", v.depth, "h") + "    return self.head(h)\n");
  json metadata = image_metadata("timm_vit", folder, C, "model.blocks", "model.", pre);
  metadata["name"] = "timm " + arch + " (" + folder.name + ", imported)";
  return {root, metadata, {}};
}

}  // namespace loratune::importer
