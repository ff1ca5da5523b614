// open_clip ViT CLIPs (open_clip_config.json + open_clip_model.safetensors): the vision transformer with
// nn.MultiheadAttention blocks (in_proj_weight) and the text transformer. Module paths are the CLIP model's
// (visual.transformer.resblocks.N.attn, transformer.resblocks.N.attn), as PEFT names them on open_clip.
#include <cmath>

#include "import/families.h"
#include "loratune/errors.h"

using nlohmann::json;

namespace loratune::importer {
namespace {

using Bias = ScriptBuilder::Bias;

const nlohmann::json kClipBpe = {{"tokenizer", "clip_bpe"}, {"merges_file", "bpe_merges.txt"}};

BlockLayout resblock_layout(bool quick_gelu, bool causal) {
  BlockLayout l;
  l.norm1 = "ln_1", l.norm2 = "ln_2", l.attention = BlockLayout::Attention::in_proj, l.qkv = "attn";
  l.out = "attn.out_proj", l.scale1 = "ls_1.gamma", l.scale2 = "ls_2.gamma", l.fc1 = "mlp.c_fc", l.fc2 = "mlp.c_proj";
  l.activation = quick_gelu ? Activation::quick_gelu : Activation::gelu;
  l.eps = 1e-5, l.causal = causal;
  return l;
}

int64_t heads_of(const json& cfg, int64_t width, const std::string& where, bool text) {
  if (text) return config_size(cfg, "heads", where, 8);
  const int64_t head_width = config_size(cfg, "head_width", where, 64);
  if (head_width == 0 || width % head_width != 0) throw InputError(where + ": vision head_width does not divide width");
  return width / head_width;
}

// The text tower's keys: at the root for CLIP, under "text." for CustomTextCLIP.
std::string text_prefix(const CheckpointTensors& ckpt) { return ckpt.has("text.token_embedding.weight") ? "text." : ""; }

bool is_text_key(const std::string& k) {
  for (const char* p : {"text.", "token_embedding.", "positional_embedding", "transformer.", "ln_final.",
                        "text_projection", "logit_scale", "logit_bias", "attn_mask"})
    if (k.rfind(p, 0) == 0) return true;
  return false;
}

// vision_cfg.image_size: a size or [size, size] (224 when absent).
int64_t trained_image_size(const json& vc, const std::string& where) {
  if (!vc.contains("image_size") || !vc["image_size"].is_array())
    return config_size(vc, "image_size", where, 224, kMaxBundleImageSize);
  const json& size = vc["image_size"];
  if (size.empty() || size.size() > 2 || !size[0].is_number_integer() || size[0] != size.back() ||
      size[0].get<int64_t>() < 1 || size[0].get<int64_t>() > kMaxBundleImageSize)
    throw InputError(where + ": vision_cfg.image_size must be a size or [size, size] from 1 to " +
                     std::to_string(kMaxBundleImageSize) + ", not " + size.dump());
  return size[0].get<int64_t>();
}

// preprocess_cfg over CLIP's defaults (OpenAI mean and std, bicubic), at `image_size`.
Preprocessing preprocessing(const json& pc, int64_t image_size, const std::string& where) {
  Preprocessing pre;
  pre.image_size = image_size;
  pre.resize_size = pre.image_size;
  pre.mean = {0.48145466f, 0.4578275f, 0.40821073f}, pre.std = {0.26862954f, 0.26130258f, 0.27577711f};
  const std::string pwhere = where + " preprocess_cfg";
  for (auto [key, target] : {std::pair<const char*, std::array<float, 3>*>{"mean", &pre.mean}, {"std", &pre.std}})
    if (pc.contains(key)) {
      try {
        *target = pc[key].get<std::array<float, 3>>();
      } catch (const json::exception&) {
        throw InputError(pwhere + ": \"" + key + "\" must be three numbers");
      }
    }
  pre.interpolation = config_string(pc, "interpolation", pwhere, "bicubic");
  return pre;
}

// Patches, the class token and positions, then ln_pre where the model has it.
std::string stem_source(int64_t width, bool ln_pre) {
  std::string stem = "def stem(self, images):\n"
                     "    x = self.visual.conv1.forward(images).flatten(2).transpose(1, 2)\n"
                     "    cls = self.visual.class_embedding.reshape(1, 1, " + std::to_string(width) + ").expand(x.size(0), -1, -1)\n"
                     "    x = torch.cat([cls, x], 1) + self.visual.positional_embedding.unsqueeze(0)\n";
  return stem + (ln_pre ? "    return self.visual.ln_pre.forward(x)\n" : "    return x\n");
}

// Pooling (class token or the mean of the patches) with ln_post before or after it, then the projection.
std::string head_source(const std::string& pool, bool ln_after_pool, bool proj) {
  const std::string pooled = pool == "tok" ? "h[:, 0]" : "h[:, 1:].mean(1)";
  std::string head = "def head(self, hidden):\n    h = hidden\n";
  if (ln_after_pool) head += "    h = self.visual.ln_post.forward(" + pooled + ")\n";
  else head += "    h = self.visual.ln_post.forward(h)\n    h = " + pooled + "\n";
  return head + (proj ? "    return torch.matmul(h, self.visual.proj)\n" : "    return h\n");
}

ImportedModel vision(const Folder& folder, const json& mc, const json& pc, const ImportOptions& options) {
  const std::string where = folder.where("open_clip_config.json");
  const json vc = mc.value("vision_cfg", json::object());
  if (vc.contains("timm_model_name") && !vc["timm_model_name"].is_null())
    throw InputError(where + ": the image tower is a timm model (" + vc["timm_model_name"].dump() + "), not a "
                     "ViT this importer builds; export MobileCLIP / MobileCLIP2 with "
                     "scripts/export/open_clip_mobileclip.py --checkpoint " + folder.dir.string() +
                     " (its text tower alone loads without Python as " + folder.dir.string() + "#text)");
  if (vc.value("attentional_pool", false)) throw InputError(where + ": attentional pooling is not imported");
  CheckpointTensors ckpt = read_weights(folder, "open_clip_model", "open_clip_pytorch_model.bin");
  ckpt.ignore_if(is_text_key);
  const int64_t W = config_size(vc, "width", where, 768), layers = config_size(vc, "layers", where, 12, kMaxImportedLayers);
  const int64_t patch = config_size(vc, "patch_size", where, 16), heads = heads_of(vc, W, where, false);
  const int64_t trained_size = trained_image_size(vc, where);
  const int64_t mlp = static_cast<int64_t>(W * config_number(vc, "mlp_ratio", where, 4.0, 0.0, 64.0));
  const int64_t embed_dim = config_size(mc, "embed_dim", where);
  const bool quick = mc.value("quick_gelu", false);
  const std::string pool = config_string(vc, "pool_type", where, "tok");
  const bool ln_after_pool = vc.value("final_ln_after_pool", false), ln_pre = !vc.value("no_ln_pre", false);
  if (pool != "tok" && pool != "avg") throw InputError(where + ": vision pool_type \"" + pool + "\" is not imported");

  const Preprocessing pre = preprocessing(pc, options.image_size > 0 ? options.image_size : trained_size, where);
  if (pre.image_size % patch != 0) throw InputError(where + ": image size is not a multiple of the patch size");

  ScriptBuilder b;
  torch::jit::Module root = b.container("ImportedOpenClipVisual");
  place(b, root, "visual.conv1", b.patch_conv(ckpt, "visual.conv1", W, 3, patch, Bias::no));
  torch::jit::Module visual = root.attr("visual").toModule();
  add_parameter(visual, "class_embedding", ckpt.take("visual.class_embedding", {W}));
  const int64_t old_grid = trained_size / patch, grid = pre.image_size / patch;
  at::Tensor pos = ckpt.take("visual.positional_embedding", {1 + old_grid * old_grid, W}).unsqueeze(0);
  add_parameter(visual, "positional_embedding", resample_position_table(pos, 1, old_grid, old_grid, grid, grid).squeeze(0));
  if (ln_pre) place(b, root, "visual.ln_pre", b.layer_norm(ckpt, "visual.ln_pre", W, 1e-5));
  const BlockLayout l = resblock_layout(quick, false);
  for (int64_t i = 0; i < layers; ++i)
    place(b, root, "visual.transformer.resblocks." + std::to_string(i),
          transformer_block(b, ckpt, "visual.transformer.resblocks." + std::to_string(i) + ".", l, {W, heads, mlp}));
  place(b, root, "visual.ln_post", b.layer_norm(ckpt, "visual.ln_post", W, 1e-5));
  const bool proj = ckpt.has("visual.proj");
  if (proj) add_parameter(visual, "proj", ckpt.take("visual.proj", {W, embed_dim}));
  ckpt.expect_all_taken();

  b.define(root, stem_source(W, ln_pre));
  b.define(root, head_source(pool, ln_after_pool, proj));
  b.define(root, "def forward(self, images):\n    h = self.stem(images)\n" +
                     run_blocks_source("self.visual.transformer.resblocks", layers, "h") + "    return self.head(h)\n");
  json m = image_metadata("open_clip_vit", folder, proj ? embed_dim : W, "visual.transformer.resblocks", "", pre);
  m["family"] = "clip";
  return {root, m, {}};
}

ImportedModel text(const Folder& folder, const json& mc) {
  const std::string where = folder.where("open_clip_config.json");
  const json tc = mc.value("text_cfg", json::object());
  if (tc.contains("hf_model_name") && !tc["hf_model_name"].is_null())
    throw InputError(where + ": the text tower is a transformers model (" + tc["hf_model_name"].dump() +
                     "), which this importer does not build");
  const std::string merges = folder.has("merges.txt") ? "merges.txt" : "bpe_simple_vocab_16e6.txt";
  if (!folder.has(merges))
    throw InputError(folder.dir.string() + ": no merges.txt (CLIP's BPE merges) for the text tower; copy "
                     "bpe_simple_vocab_16e6.txt (unpacked) from open_clip next to the weights");
  CheckpointTensors ckpt = read_weights(folder, "open_clip_model", "open_clip_pytorch_model.bin");
  ckpt.ignore_if([](const std::string& k) { return k.rfind("visual.", 0) == 0 || k == "attn_mask" || k == "logit_bias"; });
  const std::string tp = text_prefix(ckpt);
  TextTowerShape s;
  s.width = config_size(tc, "width", where, 512), s.heads = heads_of(tc, s.width, where, true);
  s.layers = config_size(tc, "layers", where, 12, kMaxImportedLayers), s.context = config_size(tc, "context_length", where, 77);
  s.vocab = config_size(tc, "vocab_size", where, 49408), s.embed_dim = config_size(mc, "embed_dim", where);
  s.mlp_hidden = static_cast<int64_t>(s.width * config_number(tc, "mlp_ratio", where, 4.0, 0.0, 64.0));
  TextTowerNames n;
  n.token_embedding = tp + "token_embedding.weight", n.position_embedding = tp + "positional_embedding";
  n.blocks = tp + "transformer.resblocks", n.final_norm = tp + "ln_final";
  n.projection = tp + "text_projection", n.projection_is_linear = false;
  n.layout = resblock_layout(mc.value("quick_gelu", false), !tc.value("no_causal_mask", false));  // MobileCLIP2: none
  return clip_text_bundle(folder, ckpt, n, s, "open_clip_text", merges, kClipBpe);
}

}  // namespace

ImportedModel import_open_clip(const Folder& folder, const json& config, Tower tower, const ImportOptions& options) {
  const std::string where = folder.where("open_clip_config.json");
  if (!config.contains("model_cfg") || !config["model_cfg"].is_object())
    throw InputError(where + ": \"model_cfg\" is missing");
  const json pc = config.value("preprocess_cfg", json::object());
  return tower == Tower::text ? text(folder, config["model_cfg"]) : vision(folder, config["model_cfg"], pc, options);
}

}  // namespace loratune::importer
