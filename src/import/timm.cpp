// timm VisionTransformer checkpoints (config.json with "architecture" and "pretrained_cfg", as timm's save_for_hf
// and the hub write them). The architecture's switches are read from the tensors present (class, register and
// distillation tokens, pre-norm, layer scale, q/k norms, fc_norm); what the tensors cannot say (heads, pooling,
// activation) comes from model_args, global_pool and the architecture name. Module paths are model.blocks.N.attn.qkv
// (module_prefix "model."), as scripts/export/timm_vit.py writes them.
#include <cmath>

#include "import/families.h"
#include "loratune/errors.h"

using nlohmann::json;

namespace loratune::importer {
namespace {

using Bias = ScriptBuilder::Bias;

bool is_square(int64_t n, int64_t* side) {
  if (n <= 0) return false;
  *side = static_cast<int64_t>(std::llround(std::sqrt(static_cast<double>(n))));
  return *side * *side == n;
}

bool has_word(const std::string& arch, const std::string& word) {
  const std::string padded = "_" + arch.substr(0, arch.find('.')) + "_";
  return padded.find("_" + word + "_") != std::string::npos;
}

// Heads: model_args, else the size word of the name for widths whose heads are not 64 wide, else width / 64.
int64_t heads_of(const json& config, const std::string& arch, int64_t width, const std::string& where) {
  if (config.contains("model_args") && config["model_args"].is_object() && config["model_args"].contains("num_heads"))
    return config_int(config["model_args"], "num_heads", where);
  for (const char* wide : {"huge", "giant", "gigantic", "so400m", "so150m", "6b"})
    if (has_word(arch, wide)) return 16;
  if (width % 64 != 0)
    throw InputError(where + ": cannot tell the number of attention heads of \"" + arch + "\" (width " +
                     std::to_string(width) + "); add \"model_args\": {\"num_heads\": N} to config.json");
  return width / 64;
}

}  // namespace

ImportedModel import_timm(const Folder& folder, const json& config, const ImportOptions& options) {
  const std::string where = folder.where("config.json");
  const std::string arch = config_string(config, "architecture", where);
  CheckpointTensors ckpt = read_weights(folder, "model", "pytorch_model.bin");
  if (!ckpt.has("patch_embed.proj.weight") || !ckpt.has("blocks.0.attn.qkv.weight"))
    throw InputError(where + ": \"" + arch + "\" is not a timm VisionTransformer (no patch_embed.proj / "
                     "blocks.N.attn.qkv tensors); supported: " + supported_checkpoint_families() +
                     ". Other architectures: scripts/export/timm_vit.py or apple_mobileclip.py");
  ckpt.ignore_if([](const std::string& k) { return k.rfind("head.", 0) == 0 || k.rfind("head_dist.", 0) == 0; });
  if (!ckpt.keys_with_prefix("attn_pool.").empty())
    throw InputError(where + ": attention-pooling heads (global_pool \"map\") are not imported");

  const auto patch_shape = ckpt.shape("patch_embed.proj.weight");
  const int64_t C = patch_shape[0], channels = patch_shape[1], patch = patch_shape[2];
  int64_t depth = 0;
  while (ckpt.has("blocks." + std::to_string(depth) + ".norm1.weight")) ++depth;
  const int64_t heads = heads_of(config, arch, C, where);

  const json cfg = config.value("pretrained_cfg", json::object());
  if (!cfg.is_object()) throw InputError(where + ": \"pretrained_cfg\" is not an object");
  Preprocessing pre;
  int64_t trained_size = 224;
  if (cfg.contains("input_size")) {
    if (!cfg["input_size"].is_array() || cfg["input_size"].size() != 3 || !cfg["input_size"][2].is_number_integer())
      throw InputError(where + ": pretrained_cfg.input_size must be [channels, height, width]");
    trained_size = cfg["input_size"][2].get<int64_t>();
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
  if (pre.image_size % patch != 0)
    throw InputError(where + ": image size " + std::to_string(pre.image_size) + " is not a multiple of patch " +
                     std::to_string(patch));

  const bool cls = ckpt.has("cls_token"), dist = ckpt.has("dist_token"), pre_norm = ckpt.has("norm_pre.weight");
  const int64_t registers = ckpt.has("reg_token") ? ckpt.shape("reg_token")[1] : 0;
  const int64_t prefix = (cls ? 1 : 0) + (dist ? 1 : 0) + registers;
  const int64_t table = ckpt.shape("pos_embed").size() == 3 ? ckpt.shape("pos_embed")[1] : -1;
  int64_t old_grid = 0;
  bool embed_class;  // position rows for the prefix tokens too
  if (prefix > 0 && is_square(table - prefix, &old_grid)) embed_class = true;
  else if (is_square(table, &old_grid)) embed_class = false;
  else throw InputError(where + ": pos_embed of " + std::to_string(table) + " rows fits no square grid with " +
                        std::to_string(prefix) + " prefix tokens");
  const int64_t pos_prefix = embed_class ? prefix : 0, grid = pre.image_size / patch;
  std::string pool = config_string(config, "global_pool", where, cls ? "token" : "avg");
  if (pool != "token" && pool != "avg")
    throw InputError(where + ": global_pool \"" + pool + "\" is not imported (token, avg)");

  BlockLayout l;
  l.norm1 = "norm1", l.norm2 = "norm2", l.attention = BlockLayout::Attention::fused, l.qkv = "attn.qkv";
  l.q_norm = "attn.q_norm", l.k_norm = "attn.k_norm", l.out = "attn.proj", l.scale1 = "ls1.gamma", l.scale2 = "ls2.gamma";
  l.fc1 = "mlp.fc1", l.fc2 = "mlp.fc2", l.qkv_bias = false, l.eps = pre_norm ? 1e-5 : 1e-6;
  const bool quick = arch.find("quickgelu") != std::string::npos ||
                     (config.contains("model_args") && config["model_args"].value("act_layer", "") == "quick_gelu");
  l.activation = quick ? Activation::quick_gelu : Activation::gelu;
  if (!ckpt.has("blocks.0.mlp.fc1.weight"))
    throw InputError(where + ": blocks without mlp.fc1 (gated MLPs) are not imported");
  const BlockShape shape{C, heads, ckpt.shape("blocks.0.mlp.fc1.weight")[0]};

  ScriptBuilder b;
  torch::jit::Module root = b.container("ImportedTimmViT");
  place(b, root, "model.patch_embed.proj", b.patch_conv(ckpt, "patch_embed.proj", C, channels, patch, Bias::optional));
  torch::jit::Module model = root.attr("model").toModule();
  if (cls) add_parameter(model, "cls_token", ckpt.take("cls_token", {1, 1, C}));
  if (registers) add_parameter(model, "reg_token", ckpt.take("reg_token", {1, registers, C}));
  if (dist) add_parameter(model, "dist_token", ckpt.take("dist_token", {1, 1, C}));
  add_parameter(model, "pos_embed", resample_position_table(ckpt.take("pos_embed", {1, table, C}), pos_prefix,
                                                            old_grid, old_grid, grid, grid));
  if (pre_norm) place(b, root, "model.norm_pre", b.layer_norm(ckpt, "norm_pre", C, l.eps));
  for (int64_t i = 0; i < depth; ++i)
    place(b, root, "model.blocks." + std::to_string(i),
          transformer_block(b, ckpt, "blocks." + std::to_string(i) + ".", l, shape));
  const bool norm = ckpt.has("norm.weight"), fc_norm = ckpt.has("fc_norm.weight");
  if (norm) place(b, root, "model.norm", b.layer_norm(ckpt, "norm", C, l.eps));
  if (fc_norm) place(b, root, "model.fc_norm", b.layer_norm(ckpt, "fc_norm", C, l.eps));
  ckpt.expect_all_taken();

  std::string tokens = "[";
  if (cls) tokens += "self.model.cls_token.expand(B, -1, -1), ";
  if (dist) tokens += "self.model.dist_token.expand(B, -1, -1), ";
  if (registers) tokens += "self.model.reg_token.expand(B, -1, -1), ";
  std::string stem = "def stem(self, images):\n"
                     "    x = self.model.patch_embed.proj.forward(images).flatten(2).transpose(1, 2)\n"
                     "    B = x.size(0)\n";
  if (!embed_class) stem += "    x = x + self.model.pos_embed\n";
  if (prefix) stem += "    x = torch.cat(" + tokens + "x], 1)\n";
  if (embed_class) stem += "    x = x + self.model.pos_embed\n";
  if (pre_norm) stem += "    x = self.model.norm_pre.forward(x)\n";
  stem += "    return x\n";
  std::string head = "def head(self, hidden):\n    h = hidden\n";
  if (norm) head += "    h = self.model.norm.forward(h)\n";
  if (dist) head += "    h = (h[:, 0] + h[:, 1]) * 0.5\n";
  else if (pool == "token") head += "    h = h[:, 0]\n";
  else head += "    h = h[:, " + std::to_string(prefix) + ":].mean(1)\n";
  if (fc_norm) head += "    h = self.model.fc_norm.forward(h)\n";
  head += "    return h\n";
  b.define(root, stem);
  b.define(root, head);
  b.define(root, "def forward(self, images):\n    h = self.stem(images)\n" +
                     run_blocks_source("self.model.blocks", depth, "h") + "    return self.head(h)\n");
  json metadata = image_metadata("timm_vit", folder, C, "model.blocks", "model.", pre);
  metadata["name"] = "timm " + arch + " (" + folder.name + ", imported)";
  return {root, metadata, {}};
}

}  // namespace loratune::importer
