"""Checkpoint folders imported natively (`loratune import`, or a folder / hf: id wherever a model is accepted) against
the upstream models' own forward on the same random weights:
  - timm VisionTransformers (class token, distillation token, registers + layer scale, CLIP-style pre-norm, average
    pooling without class token), folders as timm's own save_config_for_hf writes them;
  - transformers layouts (vit, deit, dinov2 with registers, clip, siglip): transformers is not installable here, so
    their folders are written from the timm model of the same architecture with the documented key mapping, and the
    timm model's forward is the reference (the GPU machine's transformers checks the layouts themselves);
  - open_clip ViT CLIPs, both towers, against open_clip's encode_image / encode_text;
then train / eval / merge on an imported folder (the merged file in Python equals the timm model with the adapter
folded in), the hub cache (hf:ORG/NAME), fp16 checkpoints, and damaged folders (one error line, exit 3).

usage: test_import_checkpoints.py LORATUNE_BINARY FIXTURE_DIR UPSTREAM_DIR   (exit 77: no upstream folder, skipped)
"""
import gzip
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time
import unittest

import torch

UPSTREAM = os.path.abspath(sys.argv[3])
if not os.path.isdir(os.path.join(UPSTREAM, "open_clip")):
    print(f"skipped: {UPSTREAM} has no upstream packages (see shared/upstream/README.md)")
    sys.exit(77)
# The upstream test's helpers; importing it puts the real open_clip (with the stand-ins it needs on torch 1.13) and
# timm on the path.
import test_upstream_models as up  # noqa: E402
import onnx_runtime  # noqa: E402
import open_clip  # noqa: E402
from test_upstream_models import BIN, TMP, relative_error, run  # noqa: E402
import safetensors_lite  # noqa: E402
import timm  # noqa: E402
from timm.models._hub import save_config_for_hf  # noqa: E402


def perturb(model, seed=0):
    """Random weights with every parameter away from its initial value (zero biases, unit norms, tiny layer scales
    would hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def timm_model(arch, **kwargs):
    """A random-weight timm model of `arch`, 2 blocks deep; the arguments that differ from the architecture's
    definition are kept for its config.json (timm's own model_args), as a user's push_to_hf_hub writes them."""
    torch.manual_seed(0)
    model = perturb(timm.create_model(arch, pretrained=False, num_classes=0, depth=2, **kwargs))
    model.model_args = dict(depth=2, **kwargs)
    return model


def write_folder(path, tensors, config, name="config.json", weights="model.safetensors", extra=None):
    os.makedirs(path, exist_ok=True)
    safetensors_lite.save(tensors, os.path.join(path, weights))
    with open(os.path.join(path, name), "w") as f:
        json.dump(config, f)
    for file_name, content in (extra or {}).items():
        with open(os.path.join(path, file_name), "w") as f:
            json.dump(content, f)
    return path


def write_text(path, text):
    with open(path, "w") as f:
        f.write(text)


def timm_folder(model, path):
    os.makedirs(path, exist_ok=True)
    safetensors_lite.save(model.state_dict(), os.path.join(path, "model.safetensors"))
    save_config_for_hf(model, pathlib.Path(path) / "config.json", model_args=getattr(model, "model_args", None))
    return path


def hf_blocks(sd, depth, prefix, names, ln_scale=None):
    """timm block tensors under transformers names: q/k/v split from the fused qkv rows."""
    out = {}
    for i in range(depth):
        t, h = f"blocks.{i}.", f"{prefix}{i}."
        qkv_w, qkv_b = sd[t + "attn.qkv.weight"].chunk(3), sd[t + "attn.qkv.bias"].chunk(3)
        for j, key in enumerate(names["qkv"]):
            out[h + key + ".weight"], out[h + key + ".bias"] = qkv_w[j], qkv_b[j]
        for timm_name, hf_name in (("norm1", names["norm1"]), ("norm2", names["norm2"]), ("attn.proj", names["out"]),
                                   ("mlp.fc1", names["fc1"]), ("mlp.fc2", names["fc2"])):
            for p in ("weight", "bias"):
                out[h + hf_name + "." + p] = sd[t + timm_name + "." + p]
        if ln_scale:
            out[h + ln_scale[0]], out[h + ln_scale[1]] = sd[t + "ls1.gamma"], sd[t + "ls2.gamma"]
    return out


def hf_from_resblocks(sd, source, target, layers):
    """open_clip residual blocks (nn.MultiheadAttention's fused in_proj) under transformers' CLIP/SigLIP names."""
    out = {}
    for i in range(layers):
        o, h = f"{source}{i}.", f"{target}{i}."
        for p in ("weight", "bias"):
            for part, name in zip(sd[o + "attn.in_proj_" + p].chunk(3), ("q_proj", "k_proj", "v_proj")):
                out[f"{h}self_attn.{name}.{p}"] = part
            for oc, hf in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                           ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                out[f"{h}{hf}.{p}"] = sd[f"{o}{oc}.{p}"]
    return out


VIT_NAMES = {"qkv": ["attention.attention.query", "attention.attention.key", "attention.attention.value"],
             "norm1": "layernorm_before", "norm2": "layernorm_after", "out": "attention.output.dense",
             "fc1": "intermediate.dense", "fc2": "output.dense"}
DINO_NAMES = dict(VIT_NAMES, norm1="norm1", norm2="norm2", fc1="mlp.fc1", fc2="mlp.fc2")
CLIP_NAMES = {"qkv": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], "norm1": "layer_norm1",
              "norm2": "layer_norm2", "out": "self_attn.out_proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}


def hf_config(model, model_type, **extra):
    c = {"model_type": model_type, "hidden_size": model.embed_dim, "num_hidden_layers": len(model.blocks),
         "num_attention_heads": model.blocks[0].attn.num_heads, "intermediate_size": model.blocks[0].mlp.fc1.out_features,
         "hidden_act": "gelu", "layer_norm_eps": 1e-6, "image_size": model.patch_embed.img_size[0],
         "patch_size": model.patch_embed.patch_size[0], "num_channels": 3, "qkv_bias": True}
    c.update(extra)
    return c


class Pipeline(unittest.TestCase, up.Pipeline):
    def check_import(self, source, reference, size, tol=1e-5, args=()):
        bundle = os.path.join(TMP, os.path.basename(source.rstrip("/")) + ".pt")
        out = run(BIN, "import", source, "--output", bundle, *args)
        self.assertIn("wrote " + bundle, out)
        x = self.check_bundle(bundle, reference, size, tol=tol)
        return bundle, x


class TimmFolders(Pipeline):
    def check_against_timm(self, cases):
        """Each (architecture, timm arguments): its timm folder imports equal to timm's forward."""
        for arch, kwargs in cases:
            with self.subTest(arch=arch):
                model = timm_model(arch, **kwargs)
                size = model.patch_embed.img_size[0]
                model.pretrained_cfg = dict(model.pretrained_cfg, input_size=(3, size, size))
                self.check_import(timm_folder(model, os.path.join(TMP, "timm_" + arch)), model, size)

    def test_timm_variants_equal_timm(self):
        cases = [("vit_tiny_patch16_224", {}),                                         # class token
                 ("deit_tiny_distilled_patch16_224", {}),                              # + distillation token
                 ("vit_small_patch14_reg4_dinov2", {"img_size": 98}),                  # registers, layer scale
                 ("vit_base_patch16_clip_224", {"embed_dim": 192, "num_heads": 3}),    # pre-norm, eps 1e-5
                 ("vit_medium_patch16_gap_256", {"embed_dim": 192, "num_heads": 3})]  # no class token, avg, no qkv bias
        self.check_against_timm(cases)

    def test_architectures_are_built_as_timm_defines_them(self):
        """What only the architecture's definition says (activation, pooling, norm eps, tokens) comes from the name:
        SigLIP towers with the tanh GELU and the attention-pool ("map") head, DeiT-III, registers, FlexiViT, q/k norm,
        CLIP's QuickGELU. One of each kind of entry in the table; model_args only shrink the width."""
        small = {"embed_dim": 192, "num_heads": 3}
        cases = [("vit_base_patch32_siglip_gap_256", small),        # gelu_tanh, avg, no class token, no fc_norm
                 ("vit_base_patch32_siglip_256", small),            # gelu_tanh, map head
                 ("vit_base_patch16_siglip_224", small),            # exact GELU, map head
                 ("deit3_small_patch16_224", {}),                   # no_embed_class, layer scale
                 ("vit_wee_patch16_reg1_gap_256", {}),              # register, no class token, avg + fc_norm
                 ("flexivit_small", {}),                            # FlexiViT
                 ("vit_tiny_patch16_224", {"qk_norm": True}),       # q/k norm (from model_args)
                 ("vit_base_patch32_clip_quickgelu_224", small)]    # QuickGELU, pre-norm, eps 1e-5
        self.check_against_timm(cases)

    def refused(self, folder):
        p = subprocess.run([BIN, "import", folder, "--output", folder + ".pt"], capture_output=True, text=True)
        self.assertEqual(p.returncode, 3, p.stderr)
        self.assertEqual(len(p.stderr.strip().splitlines()), 1, p.stderr)
        self.assertFalse(os.path.exists(folder + ".pt"))
        return p.stderr

    def test_other_architectures_are_refused_by_name(self):
        """timm folders of other model kinds, and VisionTransformers with parts loratune does not build, say so."""
        cases = [("eva02_tiny_patch14_224", {}, "eva02_tiny_patch14_224 is an Eva (rotary position embeddings"),
                 ("beit_base_patch16_224", {"embed_dim": 192, "num_heads": 3}, "beit_base_patch16_224 is a BEiT"),
                 ("vit_relpos_small_patch16_224", {}, "is a ViT with relative position embeddings"),
                 ("vit_dwee_patch16_reg1_gap_256", {}, "a timm VisionTransformer with differential attention"),
                 ("vit_pwee_patch16_reg1_gap_256", {}, "parallelscalingblock blocks")]
        for arch, kwargs, message in cases:
            with self.subTest(arch=arch):
                model = timm_model(arch, **kwargs)
                err = self.refused(timm_folder(model, os.path.join(TMP, "timm_" + arch)))
                self.assertIn(message, err)
                self.assertIn("supported: timm VisionTransformers", err)
        folder = timm_folder(timm_model("vit_tiny_patch16_224"), os.path.join(TMP, "timm_unknown"))
        with open(os.path.join(folder, "config.json")) as f:
            config = json.load(f)
        config["architecture"] = "vit_made_up_patch16_224.some_tag"
        write_text(os.path.join(folder, "config.json"), json.dumps(config))
        self.assertIn('"vit_made_up_patch16_224" is not an architecture timm', self.refused(folder))
        # A supported architecture whose tensors are not the ones its definition implies: the file is blamed.
        folder = timm_folder(timm_model("vit_tiny_patch16_224"), os.path.join(TMP, "timm_no_class_token"))
        config["architecture"], config["model_args"] = "vit_medium_patch16_gap_256", {"depth": 2, "embed_dim": 192,
                                                                                      "num_heads": 3}
        write_text(os.path.join(folder, "config.json"), json.dumps(config))
        self.assertIn('tensor "cls_token" is present, but vit_medium_patch16_gap_256', self.refused(folder))

    def test_image_size_resamples_the_position_table_as_timm_does(self):
        model = timm_model("vit_tiny_patch16_224")
        folder = timm_folder(model, os.path.join(TMP, "timm_resample"))
        small = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, depth=2, img_size=160)
        state = timm.models.vision_transformer.checkpoint_filter_fn(model.state_dict(), small)
        small.load_state_dict(state)
        bundle, _ = self.check_import(folder, small.eval(), 160, args=("--image-size", "160"))
        info = run(BIN, "info", bundle)
        self.assertIn("160", info)

    def test_train_eval_merge_on_the_folder_itself(self):
        model = timm_model("vit_tiny_patch16_224")
        folder = timm_folder(model, os.path.join(TMP, "timm_pipeline"))
        x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(1))
        # 2 blocks x q,v rows of the fused qkv weight; module names as PEFT has them on the timm model.
        self.train_eval_merge("timm_folder", folder, lambda m, v: m(v), model, x, 4, exported=model)

    def test_fp16_checkpoint_loads(self):
        model = timm_model("vit_tiny_patch16_224")
        folder = os.path.join(TMP, "timm_fp16")
        timm_folder(model, folder)
        safetensors_lite.save({k: v.half() for k, v in model.state_dict().items()}, os.path.join(folder, "model.safetensors"))
        rounded = timm_model("vit_tiny_patch16_224")
        rounded.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
        self.check_import(folder, rounded, 224)


class TransformersLayouts(Pipeline):
    def test_vit_with_and_without_the_vit_prefix(self):
        model = timm_model("vit_tiny_patch16_224")
        sd = model.state_dict()
        cases = (("vit.", "encoder.layer.", {"classifier.weight": torch.randn(5, 192), "classifier.bias": torch.zeros(5)}),
                 ("", "encoder.layer.", {"pooler.dense.weight": torch.randn(192, 192), "pooler.dense.bias": torch.zeros(192)}),
                 ("vit.", "layers.", {}))  # transformers 5.9+: ViTModel.layers, no encoder
        for prefix, layers, extra in cases:
            with self.subTest(prefix=prefix, layers=layers):
                t = {prefix + "embeddings.cls_token": sd["cls_token"], prefix + "embeddings.position_embeddings": sd["pos_embed"],
                     prefix + "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
                     prefix + "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
                     prefix + "layernorm.weight": sd["norm.weight"], prefix + "layernorm.bias": sd["norm.bias"], **extra}
                t.update(hf_blocks(sd, 2, prefix + layers, VIT_NAMES))
                pre = {"do_resize": True, "size": {"height": 224, "width": 224}, "resample": 2,
                       "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
                folder = write_folder(os.path.join(TMP, "hf_vit" + prefix.rstrip(".") + layers.rstrip(".")), t,
                                      hf_config(model, "vit"), extra={"preprocessor_config.json": pre})
                bundle, _ = self.check_import(folder, model, 224)
                info = run(BIN, "info", bundle)
                self.assertIn(f"vit.{layers}0.attention.attention.query", info)

    def test_deit_distillation_token(self):
        model = timm_model("deit_tiny_distilled_patch16_224")
        sd = model.state_dict()
        t = {"deit.embeddings.cls_token": sd["cls_token"], "deit.embeddings.distillation_token": sd["dist_token"],
             "deit.embeddings.position_embeddings": sd["pos_embed"],
             "deit.embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
             "deit.embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
             "deit.layernorm.weight": sd["norm.weight"], "deit.layernorm.bias": sd["norm.bias"],
             "cls_classifier.weight": torch.randn(4, 192), "distillation_classifier.weight": torch.randn(4, 192)}
        t.update(hf_blocks(sd, 2, "deit.encoder.layer.", VIT_NAMES))
        self.check_import(write_folder(os.path.join(TMP, "hf_deit"), t, hf_config(model, "deit")), model, 224)

    def test_dinov2_with_registers_at_another_size(self):
        model = timm_model("vit_small_patch14_reg4_dinov2", img_size=98)
        sd = model.state_dict()
        C = model.embed_dim
        # timm folds the class token's position into cls_token: its row in transformers' table is zero.
        t = {"embeddings.cls_token": sd["cls_token"], "embeddings.register_tokens": sd["reg_token"],
             "embeddings.mask_token": torch.zeros(1, C),
             "embeddings.position_embeddings": torch.cat([torch.zeros(1, 1, C), sd["pos_embed"]], 1),
             "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
             "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
             "layernorm.weight": sd["norm.weight"], "layernorm.bias": sd["norm.bias"]}
        t.update(hf_blocks(sd, 2, "encoder.layer.", DINO_NAMES, ("layer_scale1.lambda1", "layer_scale2.lambda1")))
        config = hf_config(model, "dinov2_with_registers", num_register_tokens=4, mlp_ratio=4.0, use_swiglu_ffn=False)
        folder = write_folder(os.path.join(TMP, "hf_dinov2_reg"), t, config)
        self.check_import(folder, model, 98)
        smaller = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, num_classes=0, depth=2, img_size=70)
        smaller.load_state_dict(timm.models.vision_transformer.checkpoint_filter_fn(model.state_dict(), smaller))
        self.check_import(folder, smaller.eval(), 70, args=("--image-size", "70"))

    def test_clip_vision_tower_with_projection(self):
        model = timm_model("vit_base_patch16_clip_224", embed_dim=192, num_heads=3)
        sd, C = model.state_dict(), model.embed_dim
        projection = torch.randn(64, C) * 0.1
        t = {"vision_model.embeddings.class_embedding": sd["cls_token"].reshape(C),
             "vision_model.embeddings.position_embedding.weight": sd["pos_embed"][0],
             "vision_model.embeddings.patch_embedding.weight": sd["patch_embed.proj.weight"],
             "vision_model.embeddings.position_ids": torch.arange(197).unsqueeze(0),
             "vision_model.pre_layrnorm.weight": sd["norm_pre.weight"], "vision_model.pre_layrnorm.bias": sd["norm_pre.bias"],
             "vision_model.post_layernorm.weight": sd["norm.weight"], "vision_model.post_layernorm.bias": sd["norm.bias"],
             "visual_projection.weight": projection, "logit_scale": torch.tensor(4.6052)}
        t.update(hf_blocks(sd, 2, "vision_model.encoder.layers.", CLIP_NAMES))
        vision = {k: v for k, v in hf_config(model, "clip_vision_model", layer_norm_eps=1e-5).items()
                  if k not in ("model_type", "qkv_bias")}
        config = {"model_type": "clip", "projection_dim": 64, "vision_config": vision, "text_config": {}}
        folder = write_folder(os.path.join(TMP, "hf_clip"), t, config)
        self.check_import(folder, lambda v: model(v) @ projection.t(), 224)

    def test_siglip_towers_attention_pooling_and_sentencepiece_text(self):
        model = timm_model("vit_base_patch16_siglip_224", embed_dim=192, num_heads=3)
        sd, C = model.state_dict(), model.embed_dim
        t = {"vision_model.embeddings.position_embedding.weight": sd["pos_embed"][0],
             "vision_model.embeddings.patch_embedding.weight": sd["patch_embed.proj.weight"],
             "vision_model.embeddings.patch_embedding.bias": sd["patch_embed.proj.bias"],
             "vision_model.post_layernorm.weight": sd["norm.weight"], "vision_model.post_layernorm.bias": sd["norm.bias"],
             "vision_model.head.probe": sd["attn_pool.latent"],
             "vision_model.head.attention.in_proj_weight": torch.cat([sd["attn_pool.q.weight"], sd["attn_pool.kv.weight"]]),
             "vision_model.head.attention.in_proj_bias": torch.cat([sd["attn_pool.q.bias"], sd["attn_pool.kv.bias"]])}
        for timm_name, hf_name in (("proj", "attention.out_proj"), ("norm", "layernorm"), ("mlp.fc1", "mlp.fc1"),
                                   ("mlp.fc2", "mlp.fc2")):
            for p in ("weight", "bias"):
                t[f"vision_model.head.{hf_name}.{p}"] = sd[f"attn_pool.{timm_name}.{p}"]
        t.update(hf_blocks(sd, 2, "vision_model.encoder.layers.", CLIP_NAMES))
        self.check_import(write_folder(os.path.join(TMP, "hf_siglip_vision"), t, hf_config(model, "siglip_vision_model")),
                          model, 224)
        # Both towers: the text tower against open_clip's bidirectional, last-token-pooled text transformer (SigLIP's
        # text model) on the same weights, with a SentencePiece model trained for the test fixtures.
        torch.manual_seed(0)
        text = perturb(open_clip.transformer.TextTransformer(
            context_length=16, vocab_size=100, width=C, heads=3, layers=2, output_dim=C, no_causal_mask=True,
            pool_type="last", proj_bias=True, act_layer=lambda: torch.nn.GELU(approximate="tanh"),
            norm_layer=lambda width: open_clip.transformer.LayerNorm(width, eps=1e-6)))
        ts = text.state_dict()
        t.update({"text_model.embeddings.token_embedding.weight": ts["token_embedding.weight"],
                  "text_model.embeddings.position_embedding.weight": ts["positional_embedding"],
                  "text_model.final_layer_norm.weight": ts["ln_final.weight"], "text_model.final_layer_norm.bias": ts["ln_final.bias"],
                  "text_model.head.weight": ts["text_projection.weight"], "text_model.head.bias": ts["text_projection.bias"],
                  "logit_scale": torch.tensor(2.3), "logit_bias": torch.tensor(-10.0)})
        t.update(hf_from_resblocks(ts, "transformer.resblocks.", "text_model.encoder.layers.", 2))
        vision = {k: v for k, v in hf_config(model, "siglip_vision_model").items() if k not in ("model_type", "qkv_bias")}
        text_config = {"hidden_size": C, "intermediate_size": 4 * C, "num_attention_heads": 3, "num_hidden_layers": 2,
                       "max_position_embeddings": 16, "vocab_size": 100, "hidden_act": "gelu_pytorch_tanh"}
        folder = write_folder(os.path.join(TMP, "hf_siglip"), t,
                              {"model_type": "siglip", "vision_config": vision, "text_config": text_config})
        shutil.copy(os.path.join(up.FIX, "models", "spiece_small.model"), os.path.join(folder, "spiece.model"))
        bundle, _ = self.check_import(folder, model, 224)
        tokens = torch.randint(3, 100, (3, 16), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            got = torch.jit.load(bundle.replace(".pt", "_text.pt"))(tokens)
            self.assertLess(relative_error(got, text(tokens)), 1e-5)
        exported = onnx_runtime.exported_outputs(BIN, bundle.replace(".pt", "_text.pt"), tokens.numpy())
        self.assertLess(relative_error(torch.from_numpy(exported), got), 1e-4, "SigLIP text: ONNX Runtime vs TorchScript")
        out = run(BIN, "eval", "--model", folder, "--zero-shot", "--data", os.path.join(up.photos(), "val"),
                  "--output", os.path.join(TMP, "siglip_zero_shot"))
        self.assertIn("(zero-shot)", out)
        self.assertIn("sentencepiece", run(BIN, "info", bundle.replace(".pt", "_text.pt")))
        meta = up.loratune_export.read_metadata(bundle.replace(".pt", "_text.pt"))
        self.assertEqual(meta["kind"], "text_encoder")
        self.assertFalse({"mean", "std", "image_size", "interpolation"} & set(meta), "no image preprocessing")


class OpenClip(Pipeline):
    MODEL_CFG = {"embed_dim": 64, "quick_gelu": True,
                 "vision_cfg": {"image_size": 64, "layers": 2, "width": 128, "head_width": 32, "patch_size": 16},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 2}}

    def model(self):
        torch.manual_seed(0)
        return perturb(open_clip.model.CLIP(**self.MODEL_CFG))

    def add_merges(self, folder):
        with gzip.open(os.path.join(UPSTREAM, "open_clip_vocab", "src", "open_clip", "bpe_simple_vocab_16e6.txt.gz")) as f:
            with open(os.path.join(folder, "merges.txt"), "wb") as out:
                out.write(f.read())

    def check_text(self, bundle, model):
        tokens = torch.zeros(2, 77, dtype=torch.long)
        tokens[:, 0], tokens[0, 1:4], tokens[1, 1:6], tokens[:, 6] = 49406, 320, 1125, 49407
        with torch.no_grad():
            text = torch.jit.load(bundle.replace(".pt", "_text.pt"))(tokens)
            self.assertLess(relative_error(text, model.encode_text(tokens)), 1e-5)
        exported = onnx_runtime.exported_outputs(BIN, bundle.replace(".pt", "_text.pt"), tokens.numpy())
        self.assertLess(relative_error(torch.from_numpy(exported), text), 1e-4, "text tower: ONNX Runtime vs TorchScript")

    def test_transformers_clip_folder_equals_open_clip(self):
        # A transformers CLIP folder (both towers, quick GELU, causal text) written from an open_clip CLIP.
        model = self.model()
        sd = model.state_dict()
        t = {"vision_model.embeddings.class_embedding": sd["visual.class_embedding"],
             "vision_model.embeddings.position_embedding.weight": sd["visual.positional_embedding"],
             "vision_model.embeddings.patch_embedding.weight": sd["visual.conv1.weight"],
             "vision_model.pre_layrnorm.weight": sd["visual.ln_pre.weight"], "vision_model.pre_layrnorm.bias": sd["visual.ln_pre.bias"],
             "vision_model.post_layernorm.weight": sd["visual.ln_post.weight"],
             "vision_model.post_layernorm.bias": sd["visual.ln_post.bias"],
             "visual_projection.weight": sd["visual.proj"].t().contiguous(),
             "text_model.embeddings.token_embedding.weight": sd["token_embedding.weight"],
             "text_model.embeddings.position_embedding.weight": sd["positional_embedding"],
             "text_model.final_layer_norm.weight": sd["ln_final.weight"], "text_model.final_layer_norm.bias": sd["ln_final.bias"],
             "text_projection.weight": sd["text_projection"].t().contiguous(), "logit_scale": sd["logit_scale"]}
        t.update(hf_from_resblocks(sd, "visual.transformer.resblocks.", "vision_model.encoder.layers.", 2))
        t.update(hf_from_resblocks(sd, "transformer.resblocks.", "text_model.encoder.layers.", 2))
        common = {"num_hidden_layers": 2, "hidden_size": 128, "intermediate_size": 512, "hidden_act": "quick_gelu"}
        config = {"model_type": "clip", "projection_dim": 64,
                  "vision_config": dict(common, num_attention_heads=4, image_size=64, patch_size=16),
                  "text_config": dict(common, num_attention_heads=4, max_position_embeddings=77, vocab_size=49408)}
        folder = write_folder(os.path.join(TMP, "hf_clip_both"), t, config)
        self.add_merges(folder)
        bundle, _ = self.check_import(folder, model.encode_image, 64)
        self.check_text(bundle, model)

    def test_both_towers_equal_open_clip(self):
        model = self.model()
        folder = os.path.join(TMP, "open_clip_vit")
        write_folder(folder, model.state_dict(), {"model_cfg": self.MODEL_CFG, "preprocess_cfg": {"interpolation": "bicubic"}},
                     name="open_clip_config.json", weights="open_clip_model.safetensors")
        self.add_merges(folder)
        bundle, x = self.check_import(folder, model.encode_image, 64)
        self.check_text(bundle, model)
        out = run(BIN, "eval", "--model", folder, "--zero-shot", "--data", os.path.join(up.photos(), "val"),
                  "--output", os.path.join(TMP, "open_clip_zero_shot"))
        self.assertIn("(zero-shot)", out)
        # The folder as head.text_model / --text-model means its text tower.
        out = run(BIN, "eval", "--model", bundle, "--zero-shot", "--text-model", folder, "--data",
                  os.path.join(up.photos(), "val"), "--output", os.path.join(TMP, "open_clip_zero_shot_text"))
        self.assertIn("(zero-shot)", out)


    def test_mobileclip2_folder_text_tower_without_python_image_tower_named(self):
        """MobileCLIP2-S0 as published (a CustomTextCLIP whose text transformer has no causal mask): FOLDER#text
        imports and equals open_clip's encode_text; the timm image tower is refused with the export script to use."""
        torch.manual_seed(0)
        model, _, _ = open_clip.create_model_and_transforms("MobileCLIP2-S0", pretrained=None)
        model.eval()
        folder = os.path.join(TMP, "MobileCLIP2-S0-OpenCLIP")
        write_folder(folder, model.state_dict(), {"model_cfg": open_clip.get_model_config("MobileCLIP2-S0")},
                     name="open_clip_config.json", weights="open_clip_model.safetensors")
        self.add_merges(folder)
        text_file = os.path.join(TMP, "mobileclip2_s0_text.pt")
        run(BIN, "import", folder + "#text", "--output", text_file)
        tokens = open_clip.get_tokenizer("MobileCLIP2-S0")(["a photo of a sneaker.", "a drawing of a boot, from above"])
        with torch.no_grad():
            got, ref = torch.jit.load(text_file)(tokens), model.encode_text(tokens)
        causal = model.text.attn_mask
        self.assertIsNone(causal, "MobileCLIP2-S0's text tower attends both ways")
        self.assertLess(relative_error(got, ref), 1e-5)
        exported = onnx_runtime.exported_outputs(BIN, text_file, tokens.numpy())
        self.assertLess(relative_error(torch.from_numpy(exported), got), 1e-4, "text: ONNX Runtime vs TorchScript")
        p = subprocess.run([BIN, "import", folder, "--output", os.path.join(TMP, "mobileclip2_s0.pt")],
                           capture_output=True, text=True)
        self.assertEqual(p.returncode, 3, p.stderr)
        self.assertIn("scripts/export/open_clip_mobileclip.py --checkpoint " + folder, p.stderr)
        self.assertIn(folder + "#text", p.stderr)


class Sources(unittest.TestCase):
    def folder(self):
        path = os.path.join(TMP, "timm_source")
        if not os.path.isdir(path):
            timm_folder(timm_model("vit_tiny_patch16_224"), path)
        return path

    def test_hub_cache_ids_resolve_offline(self):
        cache = os.path.join(TMP, "hub")
        repo = os.path.join(cache, "models--someone--tiny-vit")
        commit = "0123abc" * 5 + "01234"
        snapshot = os.path.join(repo, "snapshots", commit)
        os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
        shutil.copytree(self.folder(), snapshot, dirs_exist_ok=True)
        with open(os.path.join(repo, "refs", "main"), "w") as f:
            f.write(commit + "\n")
        env = dict(os.environ, HF_HUB_CACHE=cache)
        out = subprocess.run([BIN, "info", "hf:someone/tiny-vit"], capture_output=True, text=True, env=env)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertIn("model.blocks.1.attn.qkv", out.stdout)
        missing = subprocess.run([BIN, "info", "hf:someone/other@v2"], capture_output=True, text=True, env=env)
        self.assertEqual(missing.returncode, 3)
        self.assertIn("hf download someone/other --revision v2", missing.stderr)

    def test_hub_cache_refs_and_ids_stay_inside_the_cache(self):
        cache = os.path.join(TMP, "hub_hostile")
        repo = os.path.join(cache, "models--someone--tiny-vit")
        commit = "0123456789abcdef0123456789abcdef01234567"
        shutil.copytree(self.folder(), os.path.join(repo, "snapshots", commit), dirs_exist_ok=True)
        outside = os.path.join(TMP, "outside_the_cache")
        shutil.copytree(self.folder(), outside, dirs_exist_ok=True)
        os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
        os.symlink(outside, os.path.join(repo, "snapshots", "f" * 40))
        env = dict(os.environ, HF_HUB_CACHE=cache)

        def info(source, ref=None):
            if ref is not None:
                write_text(os.path.join(repo, "refs", "main"), ref)
            return subprocess.run([BIN, "info", source], capture_output=True, text=True, env=env)

        self.assertEqual(info("hf:someone/tiny-vit", commit).returncode, 0)
        self.assertEqual(info("hf:someone/tiny-vit@" + commit).returncode, 0)  # a commit given directly
        cases = [("hf:someone/tiny-vit", outside, "must hold a 40-digit commit hash"),            # absolute path
                 ("hf:someone/tiny-vit", "../../../" + os.path.basename(outside), "40-digit commit"),  # ..
                 ("hf:someone/tiny-vit", "not-a-commit", "40-digit commit"),
                 ("hf:someone/tiny-vit", "f" * 40, "leads outside"),                              # linked out
                 ("hf:someone/tiny-vit@.", None, "is not a hub id"),
                 ("hf:someone/tiny-vit@..", None, "is not a hub id"),
                 ("hf:/etc/passwd", None, "is not a hub id"),
                 ("hf:someone/../../etc", None, "is not a hub id"),
                 ("hf:someone/tiny\nvit\x1b[31m", None, "is not a hub id")]
        for source, ref, message in cases:
            with self.subTest(source=source, ref=ref):
                p = info(source, ref)
                self.assertEqual(p.returncode, 3, p.stderr)
                self.assertEqual(len(p.stderr.strip().splitlines()), 1, "one line, control characters escaped")
                self.assertNotIn("\x1b", p.stderr)
                self.assertIn(message, p.stderr)
                self.assertNotIn("hf download /etc", p.stderr)
        self.assertIn("tiny\\x0Avit\\x1B[31m", info("hf:someone/tiny\nvit\x1b[31m").stderr)

    def expect_error(self, mutate, *expected):
        path = os.path.join(TMP, "broken")
        shutil.rmtree(path, ignore_errors=True)
        shutil.copytree(self.folder(), path)
        mutate(path)
        p = subprocess.run([BIN, "import", path, "--output", os.path.join(TMP, "broken.pt")], capture_output=True, text=True)
        self.assertEqual(p.returncode, 3, p.stderr)
        self.assertEqual(len(p.stderr.strip().splitlines()), 1, p.stderr)
        for text in expected:
            self.assertIn(text, p.stderr)
        self.assertFalse(os.path.exists(os.path.join(TMP, "broken.pt")))

    def edit_weights(self, path, edit):
        tensors, _ = safetensors_lite.load(os.path.join(path, "model.safetensors"))
        edit(tensors)
        safetensors_lite.save(tensors, os.path.join(path, "model.safetensors"))

    def test_damaged_folders_are_one_line_errors(self):
        def config(path, **changes):
            with open(os.path.join(path, "config.json")) as f:
                c = json.load(f)
            c.update(changes)
            with open(os.path.join(path, "config.json"), "w") as f:
                json.dump(c, f)
        self.expect_error(lambda p: self.edit_weights(p, lambda t: t.pop("blocks.1.attn.proj.weight")),
                          '"blocks.1.attn.proj.weight" is missing')
        self.expect_error(lambda p: self.edit_weights(p, lambda t: t.update(extra=torch.zeros(2))), '"extra"')
        self.expect_error(lambda p: self.edit_weights(p, lambda t: t.update({"blocks.0.mlp.fc2.weight": torch.zeros(3, 3)})),
                          '"blocks.0.mlp.fc2.weight" has shape [3, 3]')
        self.expect_error(lambda p: write_text(os.path.join(p, "config.json"), '{"model_type": "llama"}'),
                          '"llama"', "vit, deit, dinov2")
        self.expect_error(lambda p: os.rename(os.path.join(p, "model.safetensors"), os.path.join(p, "pytorch_model.bin")),
                          "pickled weights are not read")
        # global_pool at the top of config.json is informational (timm builds from the name and model_args).
        self.expect_error(lambda p: config(p, model_args={"depth": 2, "global_pool": "map"}),
                          '"attn_pool.latent" is missing, but vit_tiny_patch16_224')
        self.expect_error(lambda p: config(p, model_args={"depth": 2, "patch_size": 0}),
                          "model_args.patch_size must be a positive integer")
        self.expect_error(lambda p: config(p, model_args={"depth": 2, "num_heads": 5}),
                          "5 heads (num_heads) do not divide embed_dim 192")
        self.expect_error(lambda p: write_text(os.path.join(p, "config.json"), "{not json"), "not valid JSON")


class MutatedFolders(unittest.TestCase):
    """Hostile checkpoint folders, as a fuzzer makes them: every value of every config file replaced by values of
    the wrong kind or size, and tensors replaced by ones of the wrong rank, size or type. Each import is a clean
    one-line error with exit 3 (nothing written) or a bundle that loads and runs; never a crash, a hang or exit 4."""
    VALUES = [0, -1, 2 ** 40, 0.5, "x", None, [], [0], {}, True]

    def families(self):
        timm_src = timm_folder(timm_model("vit_tiny_patch16_224"), os.path.join(TMP, "fuzz_timm"))
        clip = OpenClip()
        model = clip.model()
        open_clip_src = write_folder(os.path.join(TMP, "fuzz_open_clip"), model.state_dict(),
                                     {"model_cfg": OpenClip.MODEL_CFG, "preprocess_cfg": {"interpolation": "bicubic"}},
                                     name="open_clip_config.json", weights="open_clip_model.safetensors")
        clip.add_merges(open_clip_src)
        vit = timm_model("vit_tiny_patch16_224")
        sd = vit.state_dict()
        t = {"vit.embeddings.cls_token": sd["cls_token"], "vit.embeddings.position_embeddings": sd["pos_embed"],
             "vit.embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
             "vit.embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
             "vit.layernorm.weight": sd["norm.weight"], "vit.layernorm.bias": sd["norm.bias"]}
        t.update(hf_blocks(sd, 2, "vit.encoder.layer.", VIT_NAMES))
        pre = {"do_resize": True, "size": {"height": 224, "width": 224}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
        hf_src = write_folder(os.path.join(TMP, "fuzz_hf_vit"), t, hf_config(vit, "vit"),
                              extra={"preprocessor_config.json": pre})
        return {"timm": (timm_src, "config.json", "model.safetensors"),
                "open_clip": (open_clip_src, "open_clip_config.json", "open_clip_model.safetensors"),
                "transformers": (hf_src, "config.json", "model.safetensors")}

    @staticmethod
    def leaves(value, path=()):
        if isinstance(value, dict):
            for k, v in value.items():
                yield from MutatedFolders.leaves(v, path + (k,))
        else:
            yield path

    @staticmethod
    def replaced(config, path, value):
        config = json.loads(json.dumps(config))
        node = config
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
        return config

    def outcome(self, folder):
        bundle = folder + ".pt"
        p = subprocess.run([BIN, "import", folder, "--output", bundle, "--no-text", "--threads", "1"],
                           capture_output=True, text=True, timeout=120)
        if p.returncode == 0:
            size = up.loratune_export.read_metadata(bundle)["image_size"]
            with torch.no_grad():  # what was written loads and runs
                features = torch.jit.load(bundle)(torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)))
            self.assertTrue(bool(torch.isfinite(features).all()), folder)
            os.remove(bundle)
            return "bundle"
        self.assertEqual(p.returncode, 3, f"{folder}: exit {p.returncode}\n{p.stderr[-2000:]}")
        self.assertEqual(len(p.stderr.strip().splitlines()), 1, p.stderr)
        self.assertFalse(os.path.exists(bundle), "nothing written")
        return "error"

    def test_config_and_tensor_mutations_are_clean_errors(self):
        counts = {}
        rng = torch.Generator().manual_seed(0)
        for family, (source, config_name, weights) in self.families().items():
            with open(os.path.join(source, config_name)) as f:
                config = json.load(f)
            mutations = []
            for path in self.leaves(config):
                for value in self.VALUES:
                    mutations.append(("config", path, value))
            tensors, _ = safetensors_lite.load(os.path.join(source, weights))
            for key in sorted(tensors)[::3]:
                for kind in ("scalar", "empty", "integer", "extra_dim"):
                    mutations.append(("tensor", key, kind))
            order = torch.randperm(len(mutations), generator=rng).tolist()[:20]  # a sample: the C++ fuzz test has all
            for i in order:
                what, where, how = mutations[i]
                folder = os.path.join(TMP, f"fuzz_{family}_{i}")
                shutil.rmtree(folder, ignore_errors=True)
                shutil.copytree(source, folder)
                if what == "config":
                    write_text(os.path.join(folder, config_name), json.dumps(self.replaced(config, where, how)))
                else:
                    t = dict(tensors)
                    old = t[where]
                    t[where] = {"scalar": lambda: torch.tensor(1.0), "empty": lambda: old.new_zeros((0,) + old.shape[1:]),
                                "integer": lambda: old.long(), "extra_dim": lambda: old.unsqueeze(0)}[how]()
                    safetensors_lite.save(t, os.path.join(folder, weights))
                with self.subTest(family=family, mutation=(what, where, how)):
                    result = self.outcome(folder)
                    counts[(family, result)] = counts.get((family, result), 0) + 1
                shutil.rmtree(folder, ignore_errors=True)
        print("mutated folders:", ", ".join(f"{f} {r} {n}" for (f, r), n in sorted(counts.items())), file=sys.stderr)


if __name__ == "__main__":
    started = time.time()
    result = unittest.main(argv=[sys.argv[0], "-v", *sys.argv[4:]], exit=False).result
    failed = len(result.failures) + len(result.errors)
    print(f"{result.testsRun - failed} passed, {failed} failed ({time.time() - started:.0f} s)")
    shutil.rmtree(TMP, ignore_errors=True)
    sys.exit(1 if failed else 0)
