// Hugging Face transformers checkpoints: ViT, DeiT, DINOv2 (with registers), CLIP and SigLIP. Module paths are
// those of the *ForImageClassification / CLIPModel classes (vit.encoder.layer.N.attention.attention.query,
// vision_model.encoder.layers.N.self_attn.q_proj), so adapter keys are PEFT's on those models.
#include <cmath>

#include "common/strings.h"
#include "import/families.h"
#include "loratune/errors.h"

using nlohmann::json;

namespace loratune::importer {
namespace {

using Bias = ScriptBuilder::Bias;

const std::map<int, std::string> kPilResample = {{0, "nearest"}, {1, "area"}, {2, "bilinear"}, {3, "bicubic"},
                                                  {4, "area"},    {5, "area"}};

// Preprocessing from preprocessor_config.json (the image processor's settings), defaults from the family.
Preprocessing preprocessing(const Folder& folder, int64_t config_image_size, Preprocessing pre,
                            const ImportOptions& options) {
  pre.image_size = pre.resize_size = config_image_size;
  const std::string name = "preprocessor_config.json";
  if (folder.has(name)) {
    const json p = folder.json_file(name);
    const std::string where = folder.where(name);
    auto side = [&](const json& v, const char* what) -> int64_t {
      json size = v;
      if (v.is_object())
        for (const char* k : {"shortest_edge", "height"})
          if (v.contains(k) && v[k].is_number_integer()) size = v[k];
      if (size.is_number_integer() && size.get<int64_t>() >= 1 && size.get<int64_t>() <= kMaxBundleImageSize)
        return size.get<int64_t>();
      throw InputError(where + ": \"" + what + "\" is not a size from 1 to " + std::to_string(kMaxBundleImageSize) +
                       " this importer reads (" + printable(v.dump().substr(0, 200)) + ")");
    };
    if (p.contains("size") && !p["size"].is_null()) pre.resize_size = pre.image_size = side(p["size"], "size");
    if (p.value("do_center_crop", false) && p.contains("crop_size") && !p["crop_size"].is_null())
      pre.image_size = side(p["crop_size"], "crop_size");
    if (p.contains("resample") && p["resample"].is_number_integer()) {
      auto it = kPilResample.find(p["resample"].get<int>());
      if (it != kPilResample.end()) pre.interpolation = it->second;
    }
    for (auto [key, target] : {std::pair<const char*, std::array<float, 3>*>{"image_mean", &pre.mean}, {"image_std", &pre.std}})
      if (p.contains(key)) {
        try {
          *target = p[key].get<std::array<float, 3>>();
        } catch (const json::exception&) {
          throw InputError(where + ": \"" + key + "\" must be three numbers");
        }
      }
  }
  if (options.image_size > 0) {
    pre.resize_size = pre.resize_size * options.image_size / std::max<int64_t>(pre.image_size, 1);
    pre.image_size = options.image_size;
  }
  return pre;
}

// The prefix the checkpoint's keys carry for the base model: "vit." in ViTForImageClassification files, "" in
// ViTModel files.
std::string key_prefix(const CheckpointTensors& ckpt, const std::string& base, const std::string& probe) {
  return ckpt.has(base + "." + probe) ? base + "." : "";
}

// Index buffers older checkpoints carry.
bool is_position_ids(const std::string& k) {
  const std::string tail = "position_ids";
  return k.size() >= tail.size() && k.compare(k.size() - tail.size(), tail.size(), tail) == 0;
}

// The blocks of a ViT, DeiT or DINOv2 checkpoint (DINOv2: layer scale, an MLP or SwiGLU whose width the tensors give).
std::pair<BlockLayout, BlockShape> vit_like_blocks(const json& config, const CheckpointTensors& ckpt,
                                                   const std::string& layer_prefix, bool dinov2, const std::string& where) {
  BlockLayout l;
  l.q = "attention.attention.query", l.k = "attention.attention.key", l.v = "attention.attention.value";
  l.out = "attention.output.dense";
  l.qkv_bias = config.value("qkv_bias", true);
  l.eps = config_number(config, "layer_norm_eps", where, dinov2 ? 1e-6 : 1e-12, 0.0, 1.0);
  l.activation = activation_from_name(config_string(config, "hidden_act", where, "gelu"), where);
  BlockShape shape{config_size(config, "hidden_size", where), config_size(config, "num_attention_heads", where), 0};
  if (dinov2) {
    l.norm1 = "norm1", l.norm2 = "norm2", l.scale1 = "layer_scale1.lambda1", l.scale2 = "layer_scale2.lambda1";
    l.swiglu = config.value("use_swiglu_ffn", false);
    l.fc1 = l.swiglu ? "mlp.weights_in" : "mlp.fc1", l.fc2 = l.swiglu ? "mlp.weights_out" : "mlp.fc2";
    if (l.swiglu) l.activation = Activation::silu;
    shape.mlp_hidden = ckpt.shape(layer_prefix + "0." + l.fc1 + ".weight", 2)[0] / (l.swiglu ? 2 : 1);
  } else {
    l.norm1 = "layernorm_before", l.norm2 = "layernorm_after", l.fc1 = "intermediate.dense", l.fc2 = "output.dense";
    shape.mlp_hidden = config_size(config, "intermediate_size", where);
  }
  return {l, shape};
}

// TorchScript of the stem: patches, class (and distillation) token, positions, then the register tokens.
std::string vit_like_stem_source(const std::string& e, bool distilled, bool registers) {
  std::string stem = "def stem(self, images):\n"
                     "    x = " + e + ".patch_embeddings.projection.forward(images).flatten(2).transpose(1, 2)\n"
                     "    B = x.size(0)\n";
  stem += distilled ? "    x = torch.cat([" + e + ".cls_token.expand(B, -1, -1), " + e +
                          ".distillation_token.expand(B, -1, -1), x], 1)\n"
                    : "    x = torch.cat([" + e + ".cls_token.expand(B, -1, -1), x], 1)\n";
  stem += "    x = x + " + e + ".position_embeddings\n";
  if (registers) stem += "    x = torch.cat([x[:, :1], " + e + ".register_tokens.expand(B, -1, -1), x[:, 1:]], 1)\n";
  return stem + "    return x\n";
}

// ViT, DeiT and DINOv2: embeddings (class, distillation and register tokens), encoder.layer.N (layers.N in files of
// transformers 5.9 and later, whose ViTModel has no encoder), layernorm. Module paths follow the file.
ImportedModel vit_like(const Folder& folder, const json& config, const std::string& type, const ImportOptions& options) {
  const std::string where = folder.where("config.json");
  const std::string base = type == "vit" ? "vit" : type == "deit" ? "deit" : "dinov2";
  const bool dinov2 = base == "dinov2";
  CheckpointTensors ckpt = read_weights(folder, "model", "pytorch_model.bin");
  const std::string kp = key_prefix(ckpt, base, "embeddings.cls_token");
  ckpt.ignore_if([&](const std::string& k) {
    return k.rfind(kp + "pooler.", 0) == 0 || k.rfind("classifier.", 0) == 0 || k.rfind("cls_classifier.", 0) == 0 ||
           k.rfind("distillation_classifier.", 0) == 0 || k == kp + "embeddings.mask_token";
  });

  const int64_t C = config_size(config, "hidden_size", where), layers = config_size(config, "num_hidden_layers", where, std::nullopt, kMaxImportedLayers);
  const int64_t patch = config_size(config, "patch_size", where), channels = config_size(config, "num_channels", where, 3);
  const int64_t trained_size = config_size(config, "image_size", where, std::nullopt, kMaxBundleImageSize);
  Preprocessing defaults;
  if (!dinov2) defaults.interpolation = "bilinear";
  if (dinov2) defaults.mean = {0.485f, 0.456f, 0.406f}, defaults.std = {0.229f, 0.224f, 0.225f};
  const Preprocessing pre = preprocessing(folder, trained_size, defaults, options);

  const std::string layer_keys = ckpt.has(kp + "layers.0.attention.attention.query.weight") ? "layers." : "encoder.layer.";
  const auto [l, shape] = vit_like_blocks(config, ckpt, kp + layer_keys, dinov2, where);

  ScriptBuilder b;
  torch::jit::Module root = b.container("ImportedViT");
  const std::string emb = base + ".embeddings";
  place(b, root, emb + ".patch_embeddings.projection",
        b.patch_conv(ckpt, kp + "embeddings.patch_embeddings.projection", C, channels, patch, Bias::yes));
  torch::jit::Module embeddings = root.attr(base).toModule().attr("embeddings").toModule();
  add_parameter(embeddings, "cls_token", ckpt.take(kp + "embeddings.cls_token", {1, 1, C}));
  const bool distilled = type == "deit";
  if (distilled) add_parameter(embeddings, "distillation_token", ckpt.take(kp + "embeddings.distillation_token", {1, 1, C}));
  const int64_t registers = type == "dinov2_with_registers" ? config_int(config, "num_register_tokens", where) : 0;
  if (registers) add_parameter(embeddings, "register_tokens", ckpt.take(kp + "embeddings.register_tokens", {1, registers, C}));
  const int64_t prefix = distilled ? 2 : 1;
  const int64_t old_grid = trained_size / patch, grid = pre.image_size / patch;
  if (pre.image_size % patch != 0)
    throw InputError(where + ": image size " + std::to_string(pre.image_size) + " is not a multiple of the patch size " +
                     std::to_string(patch));
  at::Tensor pos = ckpt.take(kp + "embeddings.position_embeddings", {1, prefix + old_grid * old_grid, C});
  add_parameter(embeddings, "position_embeddings", resample_position_table(pos, prefix, old_grid, old_grid, grid, grid));

  const std::string list = base + "." + layer_keys.substr(0, layer_keys.size() - 1);
  for (int64_t i = 0; i < layers; ++i)
    place(b, root, list + "." + std::to_string(i),
          transformer_block(b, ckpt, kp + layer_keys + std::to_string(i) + ".", l, shape));
  place(b, root, base + ".layernorm", b.layer_norm(ckpt, kp + "layernorm", C, l.eps));
  ckpt.expect_all_taken();

  const std::string stem = vit_like_stem_source("self." + emb, distilled, registers > 0);
  const std::string head = "def head(self, hidden):\n    h = self." + base + ".layernorm.forward(hidden)\n" +
                           (distilled ? "    return (h[:, 0] + h[:, 1]) * 0.5\n" : "    return h[:, 0]\n");
  b.define(root, stem);
  b.define(root, head);
  b.define(root, "def forward(self, images):\n    h = self.stem(images)\n" + run_blocks_source("self." + list, layers, "h") +
                     "    return self.head(h)\n");
  ImportedModel out{root, image_metadata("hf_" + base, folder, C, list, "", pre), {}};
  return out;
}

// SigLIP's attention-pooling head (a learned probe attends over the tokens, then an MLP), placed under
// vision_model.head; returns the TorchScript lines of head().
std::string siglip_pool_head(ScriptBuilder& b, torch::jit::Module& root, CheckpointTensors& ckpt, const std::string& kp,
                             const BlockLayout& l, const BlockShape& shape) {
  const int64_t C = shape.dim, heads = shape.heads;
  const std::string hp = kp + "head.";
  torch::jit::Module attn = b.container("MultiheadAttention");
  add_parameter(attn, "in_proj_weight", ckpt.take(hp + "attention.in_proj_weight", {3 * C, C}));
  add_parameter(attn, "in_proj_bias", ckpt.take(hp + "attention.in_proj_bias", {3 * C}));
  place(b, attn, "out_proj", b.linear(ckpt, hp + "attention.out_proj", C, C, Bias::yes));
  place(b, root, "vision_model.head.attention", attn);
  torch::jit::Module map_head = root.attr("vision_model").toModule().attr("head").toModule();
  add_parameter(map_head, "probe", ckpt.take(hp + "probe", {1, 1, C}));
  place(b, root, "vision_model.head.layernorm", b.layer_norm(ckpt, hp + "layernorm", C, l.eps));
  place(b, root, "vision_model.head.mlp.fc1", b.linear(ckpt, hp + "mlp.fc1", shape.mlp_hidden, C, Bias::yes));
  place(b, root, "vision_model.head.mlp.fc2", b.linear(ckpt, hp + "mlp.fc2", C, shape.mlp_hidden, Bias::yes));
  const std::string H = std::to_string(heads), D = std::to_string(C / heads), Cs = std::to_string(C);
  return "    h = self.vision_model.post_layernorm.forward(hidden)\n"
         "    B = h.size(0)\n    N = h.size(1)\n"
         "    mh = self.vision_model.head\n"
         "    w = mh.attention.in_proj_weight\n    bias = mh.attention.in_proj_bias\n"
         "    q = torch.linear(mh.probe.expand(B, -1, -1), w[0:" + Cs + "], bias[0:" + Cs + "]).reshape(B, 1, " + H + ", " + D + ").transpose(1, 2)\n"
         "    k = torch.linear(h, w[" + Cs + ":" + std::to_string(2 * C) + "], bias[" + Cs + ":" + std::to_string(2 * C) + "]).reshape(B, N, " + H + ", " + D + ").transpose(1, 2)\n"
         "    v = torch.linear(h, w[" + std::to_string(2 * C) + ":], bias[" + std::to_string(2 * C) + ":]).reshape(B, N, " + H + ", " + D + ").transpose(1, 2)\n"
         "    s = torch.matmul(q, k.transpose(-2, -1)) * " + float_literal(1.0 / std::sqrt(static_cast<double>(C / heads))) + "\n"
         "    a = torch.matmul(torch.softmax(s, -1), v).transpose(1, 2).reshape(B, 1, " + Cs + ")\n"
         "    a = mh.attention.out_proj.forward(a)\n"
         "    m = mh.layernorm.forward(a)\n"
         "    m = mh.mlp.fc1.forward(m)\n"
         "    m = " + activation_source(l.activation, "m") + "\n"
         "    return (a + mh.mlp.fc2.forward(m))[:, 0]\n";
}

// CLIP's head: post-norm of the class token, then visual_projection where the checkpoint has it. Returns the
// TorchScript lines of head() and sets `feature_dim`.
std::string clip_class_token_head(ScriptBuilder& b, torch::jit::Module& root, CheckpointTensors& ckpt, int64_t C,
                                  int64_t& feature_dim) {
  std::string head = "    h = self.vision_model.post_layernorm.forward(hidden[:, 0])\n";
  feature_dim = C;
  if (!ckpt.has("visual_projection.weight")) return head + "    return h\n";
  feature_dim = ckpt.shape("visual_projection.weight", 2)[0];
  place(b, root, "visual_projection", b.linear(ckpt, "visual_projection", feature_dim, C, Bias::no));
  return head + "    return self.visual_projection.forward(h)\n";
}

// The vision tower of CLIP (class embedding, pre-norm, post-norm of the class token, projection) or SigLIP (no class
// token, attention-pooling head).
ImportedModel clip_like_vision(const Folder& folder, const json& config, const std::string& type,
                               const ImportOptions& options) {
  const std::string where = folder.where("config.json");
  const bool siglip = type.rfind("siglip", 0) == 0;
  const bool composite = type == "clip" || type == "siglip";
  if (composite && !config.contains("vision_config")) throw InputError(where + ": \"vision_config\" is missing");
  const json& vc = composite ? config["vision_config"] : config;
  CheckpointTensors ckpt = read_weights(folder, "model", "pytorch_model.bin");
  ckpt.ignore_if([](const std::string& k) {
    return k.rfind("text_model.", 0) == 0 || k.rfind("text_projection.", 0) == 0 || k == "logit_scale" ||
           k == "logit_bias" || is_position_ids(k);
  });
  const std::string kp = key_prefix(ckpt, "vision_model", "embeddings.patch_embedding.weight");
  const int64_t C = config_size(vc, "hidden_size", where), layers = config_size(vc, "num_hidden_layers", where, std::nullopt, kMaxImportedLayers);
  const int64_t heads = config_size(vc, "num_attention_heads", where), patch = config_size(vc, "patch_size", where);
  const int64_t channels = config_size(vc, "num_channels", where, 3), trained_size = config_size(vc, "image_size", where, std::nullopt, kMaxBundleImageSize);
  Preprocessing defaults;
  if (!siglip) defaults.mean = {0.48145466f, 0.4578275f, 0.40821073f}, defaults.std = {0.26862954f, 0.26130258f, 0.27577711f};
  const Preprocessing pre = preprocessing(folder, trained_size, defaults, options);
  if (pre.image_size % patch != 0)
    throw InputError(where + ": image size " + std::to_string(pre.image_size) + " is not a multiple of the patch size");

  BlockLayout l;
  l.norm1 = "layer_norm1", l.norm2 = "layer_norm2", l.q = "self_attn.q_proj", l.k = "self_attn.k_proj";
  l.v = "self_attn.v_proj", l.out = "self_attn.out_proj", l.fc1 = "mlp.fc1", l.fc2 = "mlp.fc2";
  l.eps = config_number(vc, "layer_norm_eps", where, siglip ? 1e-6 : 1e-5, 0.0, 1.0);
  l.activation = activation_from_name(config_string(vc, "hidden_act", where, siglip ? "gelu_pytorch_tanh" : "quick_gelu"), where);
  const BlockShape shape{C, heads, config_size(vc, "intermediate_size", where)};

  ScriptBuilder b;
  torch::jit::Module root = b.container("ImportedVisionTower");
  const std::string emb = "vision_model.embeddings";
  place(b, root, emb + ".patch_embedding",
        b.patch_conv(ckpt, kp + "embeddings.patch_embedding", C, channels, patch, siglip ? Bias::yes : Bias::no));
  const int64_t prefix = siglip ? 0 : 1, old_grid = trained_size / patch, grid = pre.image_size / patch;
  torch::jit::Module pos = b.container("Embedding");
  at::Tensor table = ckpt.take(kp + "embeddings.position_embedding.weight", {prefix + old_grid * old_grid, C});
  add_parameter(pos, "weight", resample_position_table(table.unsqueeze(0), prefix, old_grid, old_grid, grid, grid).squeeze(0));
  place(b, root, emb + ".position_embedding", pos);
  torch::jit::Module embeddings = root.attr("vision_model").toModule().attr("embeddings").toModule();
  if (!siglip) {
    add_parameter(embeddings, "class_embedding", ckpt.take(kp + "embeddings.class_embedding", {C}));
    place(b, root, "vision_model.pre_layrnorm", b.layer_norm(ckpt, kp + "pre_layrnorm", C, l.eps));
  }
  const std::string list = "vision_model.encoder.layers";
  for (int64_t i = 0; i < layers; ++i)
    place(b, root, list + "." + std::to_string(i),
          transformer_block(b, ckpt, kp + "encoder.layers." + std::to_string(i) + ".", l, shape));
  place(b, root, "vision_model.post_layernorm", b.layer_norm(ckpt, kp + "post_layernorm", C, l.eps));

  const std::string e = "self." + emb;
  std::string stem = "def stem(self, images):\n"
                     "    x = " + e + ".patch_embedding.forward(images).flatten(2).transpose(1, 2)\n";
  std::string head = "def head(self, hidden):\n";
  int64_t feature_dim = C;
  if (siglip) {
    if (!vc.value("vision_use_head", true) || !ckpt.has(kp + "head.probe"))
      throw InputError(where + ": a SigLIP vision tower without its attention-pooling head is not supported");
    head += siglip_pool_head(b, root, ckpt, kp, l, shape);
    stem += "    return x + " + e + ".position_embedding.weight.unsqueeze(0)\n";
  } else {
    stem += "    cls = " + e + ".class_embedding.reshape(1, 1, " + std::to_string(C) + ").expand(x.size(0), -1, -1)\n"
            "    x = torch.cat([cls, x], 1) + " + e + ".position_embedding.weight.unsqueeze(0)\n"
            "    return self.vision_model.pre_layrnorm.forward(x)\n";
    head += clip_class_token_head(b, root, ckpt, C, feature_dim);
  }
  ckpt.expect_all_taken();
  b.define(root, stem);
  b.define(root, head);
  b.define(root, "def forward(self, images):\n    h = self.stem(images)\n" + run_blocks_source("self." + list, layers, "h") +
                     "    return self.head(h)\n");
  return {root, image_metadata(siglip ? "hf_siglip_vision" : "hf_clip_vision", folder, feature_dim, list, "", pre), {}};
}

// The text tower of a CLIP (causal, pooled at end-of-text, BPE merges.txt) or a SigLIP (bidirectional, pooled at the
// last position, a head with bias, SentencePiece spiece.model; text lowercased without punctuation, padded with
// end-of-sentence to the context length, as its tokenizer does).
ImportedModel text_tower(const Folder& folder, const json& config, bool siglip) {
  const std::string where = folder.where("config.json");
  if (!config.contains("text_config")) throw InputError(where + ": \"text_config\" is missing");
  const std::string tokenizer_file = siglip ? "spiece.model" : "merges.txt";
  if (!folder.has(tokenizer_file))
    throw InputError(folder.dir.string() + ": no " + tokenizer_file + " (the tokenizer) for the text tower");
  const json& tc = config["text_config"];
  CheckpointTensors ckpt = read_weights(folder, "model", "pytorch_model.bin");
  ckpt.ignore_if([](const std::string& k) {
    return k.rfind("vision_model.", 0) == 0 || k.rfind("visual_projection.", 0) == 0 || k == "logit_bias" ||
           is_position_ids(k);
  });
  TextTowerShape s;
  s.width = config_size(tc, "hidden_size", where), s.heads = config_size(tc, "num_attention_heads", where);
  s.layers = config_size(tc, "num_hidden_layers", where, std::nullopt, kMaxImportedLayers), s.mlp_hidden = config_size(tc, "intermediate_size", where);
  s.context = config_size(tc, "max_position_embeddings", where, siglip ? 64 : 77);
  s.vocab = config_size(tc, "vocab_size", where, siglip ? 32000 : 49408);
  s.embed_dim = siglip ? config_size(tc, "projection_size", where, s.width) : config_size(config, "projection_dim", where, 512);
  s.eps = config_number(tc, "layer_norm_eps", where, siglip ? 1e-6 : 1e-5, 0.0, 1.0);
  TextTowerNames n;
  n.token_embedding = "text_model.embeddings.token_embedding.weight";
  n.position_embedding = "text_model.embeddings.position_embedding.weight";
  n.blocks = "text_model.encoder.layers", n.final_norm = "text_model.final_layer_norm";
  n.projection = siglip ? "text_model.head.weight" : "text_projection.weight";
  n.projection_bias = siglip, n.pool_last = siglip;
  n.layout.norm1 = "layer_norm1", n.layout.norm2 = "layer_norm2", n.layout.q = "self_attn.q_proj";
  n.layout.k = "self_attn.k_proj", n.layout.v = "self_attn.v_proj", n.layout.out = "self_attn.out_proj";
  n.layout.fc1 = "mlp.fc1", n.layout.fc2 = "mlp.fc2", n.layout.eps = s.eps, n.layout.causal = !siglip;
  n.layout.activation = activation_from_name(
      config_string(tc, "hidden_act", where, siglip ? "gelu_pytorch_tanh" : "quick_gelu"), where);
  json tokenizer = {{"tokenizer", "clip_bpe"}, {"merges_file", "bpe_merges.txt"}};
  if (siglip) {
    const json tc_file = folder.has("tokenizer_config.json") ? folder.json_file("tokenizer_config.json") : json::object();
    tokenizer = {{"tokenizer", "sentencepiece"}, {"tokenizer_file", "spiece.model"},
                 {"lowercase", tc_file.value("do_lower_case", true)}, {"strip_punctuation", true},
                 {"pad_with_end", tc_file.value("pad_token", json("</s>")) == tc_file.value("eos_token", json("</s>"))}};
  }
  return clip_text_bundle(folder, ckpt, n, s, siglip ? "hf_siglip_text" : "hf_clip_text", tokenizer_file, tokenizer);
}

}  // namespace

ImportedModel import_transformers(const Folder& folder, const json& config, Tower tower, const ImportOptions& options) {
  const std::string where = folder.where("config.json");
  const std::string type = config_string(config, "model_type", where);
  if (tower == Tower::text) {
    if (type != "clip" && type != "siglip")
      throw InputError(where + ": model_type \"" + type + "\" has no text tower loratune imports (clip and siglip "
                       "have)");
    return text_tower(folder, config, type == "siglip");
  }
  if (type == "vit" || type == "deit" || type == "dinov2" || type == "dinov2_with_registers")
    return vit_like(folder, config, type, options);
  if (type == "clip" || type == "clip_vision_model" || type == "siglip" || type == "siglip_vision_model")
    return clip_like_vision(folder, config, type, options);
  throw InputError(where + ": model_type \"" + type + "\" is not imported; supported model types: " + kTransformersTypes);
}

}  // namespace loratune::importer
