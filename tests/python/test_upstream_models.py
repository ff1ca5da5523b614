"""Every export script run as a user runs it (a subprocess with its command-line arguments, PYTHONPATH pointing at the
unmodified upstream packages in shared/upstream), on random weights saved as a checkpoint file; then `loratune info`,
a short `train`, `eval` and `merge` on each bundle. References are the upstream models' own forward in Python:
  - the bundle's features equal the upstream model's pooled features on the same input;
  - the merged classifier equals the upstream model with the adapter folded in the way PEFT reads adapter files
    (scale from adapter_config.json: r, lora_alpha, use_rslora, rank_pattern, alpha_pattern) plus the saved head;
  - `eval` right after training gives the trainer's last validation loss on the same images.

usage: test_upstream_models.py LORATUNE_BINARY FIXTURE_DIR UPSTREAM_DIR   (exit 77: no upstream folder, skipped)
"""
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import unittest

import numpy as np
import torch
from PIL import Image

BIN, FIX, UPSTREAM = sys.argv[1], sys.argv[2], os.path.abspath(sys.argv[3])
if not os.path.isdir(os.path.join(UPSTREAM, "timm")):
    print(f"skipped: {UPSTREAM} has no upstream packages (see shared/upstream/README.md)")
    sys.exit(77)
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
EXPORT = os.path.join(ROOT, "scripts", "export")
TMP = tempfile.mkdtemp(prefix="loratune_upstream_")
# open_clip 4.2 on Debian's torch 1.13 needs the stand-ins imported first (shared/upstream/README.md); export scripts
# run as subprocesses get them through a sitecustomize module, so the scripts themselves stay as a user runs them.
SITE = os.path.join(TMP, "site")
os.makedirs(SITE)
with open(os.path.join(SITE, "sitecustomize.py"), "w") as f:
    f.write("import open_clip_torch113\n")
PATHS = [SITE, os.path.join(UPSTREAM, "timm"), os.path.join(UPSTREAM, "ml-mobileclip"),
         os.path.join(UPSTREAM, "open_clip", "src"), os.path.join(UPSTREAM, "torch113_standins")]
sys.path[:0] = PATHS + [HERE, EXPORT]
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(PATHS))

import open_clip_torch113  # noqa: E402,F401
import loratune_export  # noqa: E402
import mobileclip  # noqa: E402
import onnx_runtime  # noqa: E402
import open_clip  # noqa: E402
import safetensors_lite  # noqa: E402
import timm  # noqa: E402
import torchvision  # noqa: E402

LORA = {"rank": 4, "alpha": 8.0, "rslora": True, "dropout": 0.1}  # scale 4 (alpha / sqrt(r)); alpha / r would be 2


def run(*args, **kwargs):
    p = subprocess.run(list(args), capture_output=True, text=True, env=ENV, timeout=600, **kwargs)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p.stdout


def photos():
    """3 classes (one Korean name) x 4 training and 2 validation images from the toy fixture folder."""
    root = os.path.join(TMP, "photos")
    if not os.path.isdir(root):
        for split, n in (("train", 4), ("val", 2)):
            src = os.path.join(FIX, "images", "toy", split)
            for cls in sorted(os.listdir(src)):
                os.makedirs(os.path.join(root, split, cls))
                for fn in sorted(os.listdir(os.path.join(src, cls)))[:n]:
                    shutil.copy(os.path.join(src, cls, fn), os.path.join(root, split, cls, fn))
    return root


def relative_error(got, ref):
    return float((got - ref).abs().max() / ref.abs().max().clamp(min=1e-6))


def peft_scales(config):
    """Scale of each module as PEFT computes it from adapter_config.json."""
    def pattern_value(patterns, module, default):
        for key, value in patterns.items():
            if module == key or module.endswith("." + key):
                return value
        return default

    def scale(module):
        r = pattern_value(config.get("rank_pattern") or {}, module, config["r"])
        alpha = pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
        return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return scale


def fold_adapter(model, adapter_dir, module_prefix="", rslora_override=None):
    """Adds s * B @ A into `model`'s weights (rows of a fused q/k/v weight for loratune's q/k/v slice keys) and
    returns the head (weight, bias, normalise)."""
    tensors, meta = safetensors_lite.load(os.path.join(adapter_dir, "adapter_model.safetensors"))
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        config = json.load(f)
    if rslora_override is not None:
        config = dict(config, use_rslora=rslora_override)
    scale = peft_scales(config)
    folded = 0
    with torch.no_grad():
        for key, a in tensors.items():
            if ".lora_A" not in key:
                continue
            stem, tail = key[len("base_model.model."):].split(".lora_A")
            slice_name = tail.split(".")[1] if tail.count(".") == 2 else ""
            b = tensors[key.replace(".lora_A", ".lora_B")]
            owner, _, last = stem.rpartition(".")
            if last.endswith("_weight"):  # nn.MultiheadAttention's in_proj_weight
                module, weight = model.get_submodule(module_prefix + owner), getattr(model.get_submodule(module_prefix + owner), last)
                name = owner
            else:
                module, weight, name = model.get_submodule(module_prefix + stem), model.get_submodule(module_prefix + stem).weight, stem
            rows = weight.shape[0] // 3 if slice_name else weight.shape[0]
            begin = "qkv".index(slice_name) * rows if slice_name else 0
            weight[begin:begin + rows] += scale(name) * (b.double() @ a.double()).float()
            folded += 1
    meta_info = json.loads(meta["loratune"])
    head = tensors["base_model.model.classifier.weight"], tensors["base_model.model.classifier.bias"]
    return head, meta_info.get("normalize_features", False), folded


def classify(features, head, normalise):
    if normalise:
        features = torch.nn.functional.normalize(features, dim=-1)
    return features @ head[0].t() + head[1]


class Pipeline:
    """Export a checkpoint with the script, compare the bundle, train, eval, merge, compare the merged file."""

    def check_bundle(self, bundle_path, reference, size, tol=1e-4):
        bundle = torch.jit.load(bundle_path).eval()
        x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            got, ref = bundle(x), reference(x)
        self.assertEqual(tuple(got.shape), tuple(ref.shape))
        self.assertGreater(float(ref.std(0).mean()), 1e-4, "features depend on the image, so the comparison means something")
        self.assertLess(relative_error(got, ref), tol, bundle_path)
        # The same bundle exported as ONNX and run in ONNX Runtime gives the bundle's output.
        exported = torch.from_numpy(onnx_runtime.exported_outputs(BIN, bundle_path, x.numpy()))
        self.assertLess(relative_error(exported, got), 1e-4, f"ONNX Runtime vs TorchScript: {bundle_path}")
        return x

    def train_eval_merge(self, name, bundle_path, features_of, model, x, expect_targets, module_prefix="",
                         exported=None):
        """Runs loratune on the bundle and checks the merged classifier against `features_of(model, x)` with the
        adapter folded into `model` (a fresh upstream model with the bundle's weights). `exported`: the upstream
        module whose every weight the bundle holds (for the memory plan's frozen weights)."""
        out = run(BIN, "info", bundle_path)
        self.assertIn(f"would adapt {expect_targets} weights", out)
        adapted = out.split("would adapt")[1].splitlines()[1:]
        numbers = [tuple(int(part) for part in line.split()[0].split(".") if part.isdigit()) for line in adapted]
        self.assertEqual(numbers, sorted(numbers), "blocks listed in numeric order")
        data = photos()
        run_dir = os.path.join(TMP, "run_" + name)
        config = {"model": bundle_path, "data": {"train": os.path.join(data, "train"), "val": os.path.join(data, "val"),
                                                 "workers": 2},
                  "epochs": 1, "batch_size": 4, "precision": "fp32", "optim": {"lr": 5e-3}, "lora": LORA,
                  "output_dir": run_dir}
        config_path = run_dir + ".json"
        with open(config_path, "w") as f:
            json.dump(config, f)
        # The memory plan of this run: its frozen weights are the upstream model's parameters and buffers in fp32, its
        # trainable tensors the adapters of the weights `info` lists and the 3-class head.
        plan = json.loads(run(BIN, "plan", "--config", config_path, "--json"))
        items = {item["name"]: item["bytes"] for item in plan["items"]}
        self.assertEqual(plan["total"], sum(items.values()))
        if exported is not None:
            upstream = sum(p.numel() for p in exported.parameters()) + sum(b.numel() for b in exported.buffers())
            self.assertEqual(items["frozen weights (fp32)"], 4 * upstream)
        run(BIN, "train", "--config", config_path)
        with open(os.path.join(run_dir, "summary.json")) as f:
            summary = json.load(f)
        self.assertEqual(summary["steps"], 3)
        eval_dir = os.path.join(TMP, "eval_" + name)
        run(BIN, "eval", "--model", bundle_path, "--adapter", os.path.join(run_dir, "adapter"), "--data",
            os.path.join(data, "val"), "--output", eval_dir)
        with open(os.path.join(eval_dir, "metrics.json")) as f:
            evaluated = json.load(f)
        self.assertAlmostEqual(evaluated["loss"], summary["final_val_loss"], delta=1e-5 * max(1.0, summary["final_val_loss"]))

        with open(os.path.join(run_dir, "adapter", "adapter_config.json")) as f:
            peft_config = json.load(f)
        self.assertEqual((peft_config["r"], peft_config["lora_alpha"], peft_config["use_rslora"], peft_config["lora_dropout"]),
                         (LORA["rank"], LORA["alpha"], LORA["rslora"], LORA["dropout"]))
        self.assertEqual(peft_config["rank_pattern"], {})

        merged = os.path.join(TMP, name + "_merged.pt")
        run(BIN, "merge", "--base", bundle_path, "--adapter", os.path.join(run_dir, "adapter"), "--output", merged)
        with torch.no_grad():
            got = torch.jit.load(merged).eval()(x)
            base_state = {k: v.clone() for k, v in model.state_dict().items()}
            head, normalise, folded = fold_adapter(model, os.path.join(run_dir, "adapter"), module_prefix)
            self.assertEqual(folded, expect_targets)
            ref = classify(features_of(model, x), head, normalise)
            model.load_state_dict(base_state)
            fold_adapter(model, os.path.join(run_dir, "adapter"), module_prefix, rslora_override=False)
            wrong_scale = classify(features_of(model, x), head, normalise)
        tol = 1e-4
        self.assertLess(relative_error(got, ref), tol, "merged file vs the upstream model with the adapter folded in")
        self.assertGreater(relative_error(got, wrong_scale), 10 * tol, "the adapter's scale is visible in the outputs")


def save_checkpoint(model, name):
    path = os.path.join(TMP, name + ".pth")
    torch.save(model.state_dict(), path)
    return path


class Timm(unittest.TestCase, Pipeline):
    CASES = [  # model name, extra export arguments, full pipeline
        ("vit_tiny_patch16_224", [], True),
        ("deit_tiny_distilled_patch16_224", [], True),  # distillation token: features average two tokens
        ("vit_small_patch14_reg4_dinov2", ["--image-size", "224"], True),  # register tokens, resized position table
        ("vit_base_patch16_224", [], False),
    ]

    def test_export_and_pipeline(self):
        for name, extra, pipeline in self.CASES:
            with self.subTest(model=name):
                start = time.time()
                torch.manual_seed(0)
                kwargs = {"img_size": int(extra[1])} if extra else {}
                reference = timm.create_model(name, pretrained=False, **kwargs).eval()  # with its 1000-class head
                checkpoint = save_checkpoint(reference, name)
                reference.reset_classifier(0)
                bundle = os.path.join(TMP, name + ".pt")
                run(sys.executable, os.path.join(EXPORT, "timm_vit.py"), "--model", name, "--checkpoint", checkpoint,
                    *extra, "--output", bundle)
                cfg = timm.data.resolve_data_config({"input_size": (3, 224, 224)} if extra else {}, model=reference)
                x = self.check_bundle(bundle, reference, cfg["input_size"][-1])
                files = {"loratune.json": ""}
                torch.jit.load(bundle, _extra_files=files)
                meta = json.loads(files["loratune.json"])
                self.assertEqual((meta["image_size"], meta["interpolation"], meta["mean"]),
                                 (cfg["input_size"][-1], cfg["interpolation"], list(cfg["mean"])))
                self.assertEqual(meta["resize_size"], int(math.floor(cfg["input_size"][-1] / cfg["crop_pct"])))
                if pipeline:
                    depth = len(reference.blocks)
                    self.train_eval_merge(name, bundle, lambda m, v: m(v), reference, x, 2 * depth, exported=reference)
                print(f"  {name}: {time.time() - start:.1f} s", flush=True)

    def test_other_architectures_are_named_not_a_traceback(self):
        for name in ("eva02_tiny_patch14_224", "beit_base_patch16_224"):
            with self.subTest(model=name):
                p = subprocess.run([sys.executable, os.path.join(EXPORT, "timm_vit.py"), "--model", name, "--random-init",
                                    "--output", os.path.join(TMP, name + ".pt")], capture_output=True, text=True, env=ENV,
                                   timeout=600)
                self.assertEqual(p.returncode, 1, p.stderr)
                self.assertNotIn("Traceback", p.stderr)
                self.assertIn("an architecture this exporter does not support", p.stderr.strip().splitlines()[-1])
                self.assertFalse(os.path.exists(os.path.join(TMP, name + ".pt")))

    def test_random_init_flag_needs_no_weights(self):
        bundle = os.path.join(TMP, "random_tiny.pt")
        out = run(sys.executable, os.path.join(EXPORT, "timm_vit.py"), "--model", "vit_tiny_patch16_224", "--random-init",
                  "--output", bundle)
        self.assertIn("random init", out)
        self.assertEqual(tuple(torch.jit.load(bundle)(torch.randn(1, 3, 224, 224)).shape), (1, 192))


class Torchvision(unittest.TestCase, Pipeline):
    def test_vit_b_32_checkpoint(self):  # the pipeline on B/32: B/16's layout at a quarter of its tokens
        start = time.time()
        torch.manual_seed(0)
        reference = torchvision.models.vit_b_32().eval()
        checkpoint = save_checkpoint(reference, "vit_b_32")
        reference.heads = torch.nn.Identity()
        bundle = os.path.join(TMP, "vit_b_32.pt")
        run(sys.executable, os.path.join(EXPORT, "torchvision_vit.py"), "--arch", "vit_b_32", "--checkpoint", checkpoint,
            "--output", bundle)
        files = {"loratune.json": ""}
        torch.jit.load(bundle, _extra_files=files)
        meta = json.loads(files["loratune.json"])
        self.assertEqual((meta["image_size"], meta["resize_size"], meta["interpolation"]), (224, 256, "bilinear"))
        x = self.check_bundle(bundle, reference, 224)
        self.train_eval_merge("vit_b_32", bundle, lambda m, v: m(v), reference, x, 24, exported=reference)
        print(f"  torchvision vit_b_32: {time.time() - start:.1f} s", flush=True)

    def test_random_init_keeps_the_architecture(self):
        bundle = os.path.join(TMP, "vit_b_16_random.pt")
        run(sys.executable, os.path.join(EXPORT, "torchvision_vit.py"), "--arch", "vit_b_16", "--random-init",
            "--output", bundle)
        files = {"loratune.json": ""}
        m = torch.jit.load(bundle, _extra_files=files)
        meta = json.loads(files["loratune.json"])
        self.assertEqual((meta["image_size"], meta["mean"]), (224, [0.485, 0.456, 0.406]))
        self.assertEqual(tuple(m(torch.randn(1, 3, 224, 224)).shape), (1, 768))
        self.assertEqual(len([n for n, _ in m.named_modules() if n.endswith("self_attention")]), 12)


def mobileclip_checkpoint(name):
    """Apple's model with random weights made informative: layer scales 0.5, BatchNorm statistics recalibrated on a
    few images (Apple's initialisation gives nearly the same output for every image), the text projection set."""
    torch.manual_seed(0)
    model, _, _ = mobileclip.create_model_and_transforms(name, pretrained=None, reparameterize=False)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "layer_scale" in pname:
                p.fill_(0.5)
        model.text_encoder.projection_layer.normal_(0, model.text_encoder.projection_layer.shape[0] ** -0.5)
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
                m.momentum = None
        model.image_encoder.train()
        size = 224 if name.endswith("_b") else 256
        model.image_encoder(torch.rand(8, 3, size, size, generator=torch.Generator().manual_seed(2)))
    return save_checkpoint(model.eval(), name)


class MobileCLIP(unittest.TestCase, Pipeline):
    # name, input size, adapted weights (q, v), the whole pipeline (B's ViT tower: export and comparison only; the
    # pipeline on fused q/v of a ViT runs on timm's and MobileCLIP2's)
    CASES = [("mobileclip_s0", 256, 4, True), ("mobileclip_b", 224, 24, False)]

    def test_export_and_pipeline(self):
        for name, size, targets, pipeline in self.CASES:
            with self.subTest(model=name):
                start = time.time()
                checkpoint = mobileclip_checkpoint(name)
                prefix = os.path.join(TMP, name)
                run(sys.executable, os.path.join(EXPORT, "apple_mobileclip.py"), "--model", name, "--checkpoint",
                    checkpoint, "--output", prefix)
                reference, _, _ = mobileclip.create_model_and_transforms(name, pretrained=checkpoint)
                reference.eval()
                x = self.check_bundle(prefix + "_image.pt", reference.image_encoder, size, tol=2e-4)
                tokens = torch.zeros(2, 77, dtype=torch.long)
                tokens[:, 0], tokens[0, 1:4], tokens[1, 1:6], tokens[:, 6] = 49406, 320, 1125, 49407
                with torch.no_grad():
                    text = torch.jit.load(prefix + "_text.pt")(tokens)
                    text_ref = reference.text_encoder(tokens)
                self.assertLess(relative_error(text, text_ref), 1e-4)
                text_onnx = torch.from_numpy(onnx_runtime.exported_outputs(BIN, prefix + "_text.pt", tokens.numpy()))
                self.assertLess(relative_error(text_onnx, text), 1e-4, "text tower: ONNX Runtime vs TorchScript")
                self.assertIn("tokens -> text embeddings", run(BIN, "info", prefix + "_text.pt"))
                if pipeline:
                    self.train_eval_merge(name, prefix + "_image.pt", lambda m, v: m.image_encoder(v), reference, x, targets)
                else:
                    self.assertIn(f"would adapt {targets} weights", run(BIN, "info", prefix + "_image.pt"))
                print(f"  {name}: {time.time() - start:.1f} s", flush=True)

    def test_zero_shot_eval_runs_on_the_export(self):
        prefix = os.path.join(TMP, "mobileclip_s0")
        if not os.path.exists(prefix + "_image.pt"):
            run(sys.executable, os.path.join(EXPORT, "apple_mobileclip.py"), "--model", "mobileclip_s0", "--random-init",
                "--output", prefix)
        out = run(BIN, "eval", "--model", prefix + "_image.pt", "--zero-shot", "--data", os.path.join(photos(), "val"),
                  "--output", os.path.join(TMP, "zero_shot"))
        self.assertIn("(zero-shot)", out)


def informative(visual, size):
    """Random MobileCLIP image weights made informative (see shared/upstream/README.md): layer scales 0.5, BatchNorm
    statistics recalibrated on a few images."""
    with torch.no_grad():
        for pname, p in visual.named_parameters():
            if "layer_scale" in pname:
                p.fill_(0.5)
        for m in visual.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
                m.momentum = None
        visual.train()
        visual(torch.rand(8, 3, size, size, generator=torch.Generator().manual_seed(2)))
    visual.eval()


def open_clip_checkpoint(name, size):
    torch.manual_seed(0)
    model, _, _ = open_clip.create_model_and_transforms(name, pretrained=None)
    informative(model.visual, size)
    return save_checkpoint(model.eval(), name)


class OpenClipMobileCLIP(unittest.TestCase, Pipeline):
    """MobileCLIP2 through open_clip: exported, compared with open_clip's encode_image / encode_text, then trained,
    evaluated and merged. By default one size of each kind of tower (about 4 minutes); LORATUNE_UPSTREAM_ALL=1 runs
    every size (about 15 minutes on 2 cores)."""

    CASES = [  # name, input size, adapted weights (q, v of every attention block), in the default run, pipeline
        ("MobileCLIP2-S0", 256, 4, True, True),    # attention in the last stage (2 blocks); text without causal mask
        ("MobileCLIP2-S3", 256, 12, True, True),   # attention in the last two stages (4 + 2 blocks): stage-level blocks
        ("MobileCLIP2-B", 224, 24, True, False),   # ViT-B/16 with a convolutional stem; causal text mask
        ("MobileCLIP2-S2", 256, 8, False, True),
        ("MobileCLIP2-S4", 256, 16, False, True),
        ("MobileCLIP2-L-14", 224, 48, False, True),
        ("MobileCLIP-S1", 256, 8, False, True),    # open_clip's first-generation configs
    ]

    def test_export_compares_with_open_clip_and_trains(self):
        everything = os.environ.get("LORATUNE_UPSTREAM_ALL") == "1"
        tokenizer_texts = ["a photo of a sneaker.", "a drawing of a 운동화, seen from above"]
        for name, size, targets, default, pipeline in self.CASES:
            if not (default or everything):
                continue
            with self.subTest(model=name):
                start = time.time()
                checkpoint = open_clip_checkpoint(name, size)
                prefix = os.path.join(TMP, name)
                run(sys.executable, os.path.join(EXPORT, "open_clip_mobileclip.py"), "--model", name, "--checkpoint",
                    checkpoint, "--output", prefix)
                reference, _, _ = open_clip.create_model_and_transforms(name, pretrained=checkpoint)
                reference.eval()
                meta = loratune_export.read_metadata(prefix + "_image.pt")
                release = open_clip.get_pretrained_cfg(name, open_clip.list_pretrained_tags_by_model(name)[0])
                self.assertEqual((meta["image_size"], meta["resize_size"], meta["interpolation"]),
                                 (size, size, release["interpolation"]))
                self.assertEqual(meta["mean"], [float(v) for v in release["mean"]])
                x = self.check_bundle(prefix + "_image.pt", reference.encode_image, size, tol=2e-4)
                tokens = open_clip.get_tokenizer(name)(tokenizer_texts)
                with torch.no_grad():
                    text = torch.jit.load(prefix + "_text.pt")(tokens)
                    text_ref = reference.encode_text(tokens)
                self.assertGreater(float((text_ref[0] - text_ref[1]).abs().max()), 1e-3)
                self.assertLess(relative_error(text, text_ref), 1e-4)
                text_onnx = torch.from_numpy(onnx_runtime.exported_outputs(BIN, prefix + "_text.pt", tokens.numpy()))
                self.assertLess(relative_error(text_onnx, text), 1e-4, "text tower: ONNX Runtime vs TorchScript")
                if pipeline or everything:
                    self.train_eval_merge(name, prefix + "_image.pt", lambda m, v: m.encode_image(v), reference, x, targets)
                else:
                    self.assertIn(f"would adapt {targets} weights", run(BIN, "info", prefix + "_image.pt"))
                print(f"  {name}: {time.time() - start:.1f} s", flush=True)
                for suffix in ("_image.pt", "_text.pt"):
                    os.remove(prefix + suffix)
                os.remove(checkpoint)

    def test_a_checkpoint_folder_as_published_and_a_wrong_tower(self):
        """A folder with open_clip_config.json (as on the hub) gives the model and its preprocessing; a plain
        open_clip ViT CLIP is named, not a traceback."""
        folder = os.path.join(TMP, "MobileCLIP2-S0-OpenCLIP")
        os.makedirs(folder)
        torch.manual_seed(0)
        model, _, _ = open_clip.create_model_and_transforms("MobileCLIP2-S0", pretrained=None)
        informative(model.visual, 256)
        torch.save(model.state_dict(), os.path.join(folder, "open_clip_pytorch_model.bin"))
        release = open_clip.get_pretrained_cfg("MobileCLIP2-S0", "dfndr2b")
        with open(os.path.join(folder, "open_clip_config.json"), "w") as f:
            json.dump({"model_cfg": open_clip.get_model_config("MobileCLIP2-S0"),
                       "preprocess_cfg": {"mean": list(release["mean"]), "std": list(release["std"]),
                                          "interpolation": "bilinear", "resize_mode": "shortest"}}, f)
        prefix = os.path.join(TMP, "from_folder")
        out = run(sys.executable, os.path.join(EXPORT, "open_clip_mobileclip.py"), "--checkpoint", folder,
                  "--output", prefix)
        self.assertIn("MobileCLIP2-S0-OpenCLIP", out)
        meta = loratune_export.read_metadata(prefix + "_image.pt")
        self.assertEqual((meta["mean"], meta["interpolation"]), ([0.0, 0.0, 0.0], "bilinear"))
        self.check_bundle(prefix + "_image.pt", model.eval().encode_image, 256, tol=2e-4)
        p = subprocess.run([sys.executable, os.path.join(EXPORT, "open_clip_mobileclip.py"), "--model", "ViT-B-32",
                            "--random-init", "--output", os.path.join(TMP, "vit_b_32")], capture_output=True, text=True,
                           env=ENV, timeout=600)
        self.assertEqual(p.returncode, 1, p.stderr)
        self.assertNotIn("Traceback", p.stderr)
        self.assertIn("loratune import", p.stderr.strip().splitlines()[-1])
        self.assertFalse(os.path.exists(os.path.join(TMP, "vit_b_32_image.pt")))


def sorted_photos(folder, classes):
    """The photos of a class folder in loratune's order: class by class, file names sorted."""
    return [os.path.join(folder, c, fn) for c in classes for fn in sorted(os.listdir(os.path.join(folder, c)))]


class OpenClipZeroShot(unittest.TestCase):
    def test_zero_shot_eval_equals_open_clip(self):
        """`eval --zero-shot` on a MobileCLIP2-S0 export equals open_clip's own zero-shot classifier: open_clip's
        tokenizer on the same prompts (loratune's templates; a Korean class name too), its encode_text / encode_image,
        the exported logit scale and the release's preprocessing, on photos already at the input size (so that no
        resampling differs)."""
        sys.path.insert(0, os.path.join(ROOT, "tests", "fixtures"))
        from make_mobileclip_fixtures import TEMPLATES  # loratune's default_templates()
        name = "MobileCLIP2-S0"
        checkpoint = open_clip_checkpoint(name, 256)
        prefix = os.path.join(TMP, "zero_shot_s0")
        run(sys.executable, os.path.join(EXPORT, "open_clip_mobileclip.py"), "--model", name, "--checkpoint", checkpoint,
            "--output", prefix)
        model, _, _ = open_clip.create_model_and_transforms(name, pretrained=checkpoint)
        model.eval()
        folder = os.path.join(TMP, "zero_shot_photos")
        source = os.path.join(photos(), "train")
        classes = sorted(os.listdir(source))
        images, labels = [], []
        for label, cls in enumerate(classes):
            os.makedirs(os.path.join(folder, cls))
            for fn in sorted(os.listdir(os.path.join(source, cls))):
                image = Image.open(os.path.join(source, cls, fn)).convert("RGB").resize((256, 256), Image.BILINEAR)
                image.save(os.path.join(folder, cls, os.path.splitext(fn)[0] + ".png"))
                images.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255)
                labels.append(label)
        out = os.path.join(TMP, "zero_shot_s0_eval")
        run(BIN, "eval", "--model", prefix + "_image.pt", "--zero-shot", "--data", folder, "--output", out)
        with open(os.path.join(out, "metrics.json")) as f:
            got = json.load(f)
        meta = loratune_export.read_metadata(prefix + "_image.pt")
        tokenizer = open_clip.get_tokenizer(name)

        def open_clip_zero_shot(model):
            with torch.no_grad():
                heads = []
                for cls in classes:
                    prompts = [t.format(cls.replace("_", " ")) for t in TEMPLATES]
                    text = torch.nn.functional.normalize(model.encode_text(tokenizer(prompts)), dim=-1)
                    heads.append(torch.nn.functional.normalize(text.mean(0), dim=-1))
                head = meta["logit_scale"] * torch.stack(heads)
                x = (torch.stack(images) - torch.tensor(meta["mean"]).view(1, 3, 1, 1)) / torch.tensor(meta["std"]).view(1, 3, 1, 1)
                logits = torch.nn.functional.normalize(model.encode_image(x), dim=-1) @ head.t()
                return logits, float(torch.nn.functional.cross_entropy(logits, torch.tensor(labels)))

        # eval --retrieval's reference: open_clip's towers on the same photos and captions (metadata.jsonl as Hugging
        # Face lays it out, one or two captions per photo, Korean too); ranks count what scores strictly higher.
        captions, owner = [], []
        with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
            for i, (label, path) in enumerate(zip(labels, sorted_photos(folder, classes))):
                texts = [f"a photo of {classes[label]} number {i}"] + ([f"{classes[label]}, seen again"] if i % 2 else [])
                f.write(json.dumps({"file_name": os.path.relpath(path, folder), "text": texts}, ensure_ascii=False) + "\n")
                captions += texts
                owner += [i] * len(texts)

        def open_clip_retrieval(model):
            with torch.no_grad():
                x = (torch.stack(images) - torch.tensor(meta["mean"]).view(1, 3, 1, 1)) / torch.tensor(meta["std"]).view(1, 3, 1, 1)
                img = torch.nn.functional.normalize(model.encode_image(x).double(), dim=-1)
                txt = torch.nn.functional.normalize(model.encode_text(tokenizer(captions)).double(), dim=-1)
            sim, own = img @ txt.t(), torch.zeros(len(images), len(captions), dtype=torch.bool)
            own[torch.tensor(owner), torch.arange(len(captions))] = True
            best = sim.masked_fill(~own, float("-inf")).amax(1, keepdim=True)
            ranks = {"image_to_text": (sim > best).sum(1) + 1,
                     "text_to_image": (sim > sim[torch.tensor(owner), torch.arange(len(captions))]).sum(0) + 1}
            return {d: {"mean_rank": float(r.double().mean()), **{f"recall@{k}": float((r <= k).double().mean())
                                                                  for k in (1, 5, 10)}} for d, r in ranks.items()}

        def assert_retrieval_equal(got, expected):
            for direction, values in expected.items():
                queries = len(images) if direction == "image_to_text" else len(captions)
                for key, value in values.items():  # a near tie may fall either way at float32: one query
                    self.assertAlmostEqual(got[direction][key], value, delta=(2 if key == "mean_rank" else 1) / queries
                                           + 1e-9, msg=f"{direction} {key}")

        base_retrieval = open_clip_retrieval(model)
        logits, loss = open_clip_zero_shot(model)
        self.assertTrue(any(not c.isascii() for c in classes), "a Korean class name goes through both tokenizers")
        self.assertGreater(float(logits.std()), 1e-3, "the logits depend on image and class")
        self.assertAlmostEqual(got["loss"], loss, delta=1e-4 * max(1.0, loss))
        self.assertAlmostEqual(got["top1"], int((logits.argmax(1) == torch.tensor(labels)).sum()) / len(labels), delta=1e-9)

        # loss contrastive (FLYP) on both towers: the adapter folded into open_clip's whole CLIP, as PEFT reads its keys
        # (visual.trunk... and text.transformer...), is the classifier loratune saved and the one that
        # `eval --zero-shot --adapter` makes anew from the adapted towers.
        run_dir = os.path.join(TMP, "flyp_s0")
        with open(run_dir + ".json", "w") as f:
            json.dump({"model": prefix + "_image.pt", "data": {"train": folder, "val": folder}, "loss": "contrastive",
                       "head": {"init": "zero_shot"}, "max_steps": 2, "batch_size": 4, "optim": {"lr": 0.01},
                       "precision": "fp32", "lora": {"dropout": 0.0}, "output_dir": run_dir}, f)
        run(BIN, "train", "--config", run_dir + ".json")
        adapter = os.path.join(run_dir, "adapter")
        _, _, folded = fold_adapter(model, adapter)
        self.assertEqual(folded, 4 + 2 * len(model.text.transformer.resblocks), "q/v of S0's image and text attention")
        _, adapted_loss = open_clip_zero_shot(model)
        self.assertGreater(abs(adapted_loss - loss), 1e-4, "training moved the model")
        for extra in ([], ["--zero-shot"]):
            out = os.path.join(TMP, "flyp_s0_eval" + "".join(extra))
            run(BIN, "eval", "--model", prefix + "_image.pt", "--adapter", adapter, *extra, "--data", folder, "--output", out)
            with open(os.path.join(out, "metrics.json")) as f:
                self.assertAlmostEqual(json.load(f)["loss"], adapted_loss, delta=1e-4 * max(1.0, adapted_loss), msg=extra)
        # Retrieval of the base and of the adapted towers: open_clip's, before and after folding the adapter in.
        out = os.path.join(TMP, "flyp_s0_retrieval")
        run(BIN, "eval", "--model", prefix + "_image.pt", "--adapter", adapter, "--retrieval",
            os.path.join(folder, "metadata.jsonl"), "--output", out, "--threads", "2")
        with open(os.path.join(out, "metrics.json")) as f:
            got = json.load(f)["retrieval"]
        self.assertEqual((got["images"], got["texts"]), (len(images), len(captions)))
        assert_retrieval_equal(got["base"], base_retrieval)
        assert_retrieval_equal(got["adapted"], open_clip_retrieval(model))
        self.assertNotEqual(got["base"], got["adapted"])


if __name__ == "__main__":
    started = time.time()
    result = unittest.main(argv=[sys.argv[0], "-v", *sys.argv[4:]], exit=False).result
    failed = len(result.failures) + len(result.errors)
    print(f"{result.testsRun - failed} passed, {failed} failed ({time.time() - started:.0f} s)")
    shutil.rmtree(TMP, ignore_errors=True)
    sys.exit(1 if failed else 0)
