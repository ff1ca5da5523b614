"""`loratune export --format onnx` against a real runtime: the ONNX files run in ONNX Runtime (onnxruntime-node from
npm) and give the TorchScript model's outputs (torch.jit.load of the same file, Python torch) at batch sizes the
export never saw; the ONNX checker (Debian's python3-onnx) passes with shape inference; the preprocessing is in the
metadata; an operator with no mapping is named with its module and nothing is written.

usage: test_onnx_export.py LORATUNE_BINARY FIXTURE_DIR [TestClass ...]
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import unittest

import numpy as np
import onnx
import torch
from PIL import Image

BIN, FIX = sys.argv[1:3]
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import onnx_runtime  # noqa: E402

MODELS = os.path.join(FIX, "models")
TMP = tempfile.mkdtemp(prefix="loratune_onnx_")
LAYOUTS = ["hf_script", "hf_trace", "timm_script", "timm_trace", "torchvision_script", "torchvision_trace"]
TOLERANCE = 1e-4  # max |onnx - torchscript| / max(1, max |torchscript|), fp32


def run(*args):
    p = subprocess.run([BIN, *args, "--threads", "1"], capture_output=True, text=True, timeout=600)
    return p.returncode, p.stdout, p.stderr


def onnx_runtime_outputs(model, x):
    return onnx_runtime.run_onnx(BIN, model, x)


def torchscript(path, x):
    m = torch.jit.load(path).eval()
    with torch.no_grad():
        return m(torch.from_numpy(x)).numpy()


def relative(a, b):
    return float(np.abs(a - b).max() / max(1.0, float(np.abs(b).max())))


def merged(layout):
    """The fixture adapter merged into its base: a TorchScript classifier."""
    path = os.path.join(TMP, f"{layout}.merged.pt")
    if not os.path.exists(path):
        code, _, err = run("merge", "--base", os.path.join(MODELS, layout + ".pt"), "--adapter",
                           os.path.join(MODELS, "adapter_" + layout), "--output", path)
        assert code == 0, err
    return path


def bundle_info(path):
    files = {"loratune.json": ""}
    torch.jit.load(path, _extra_files=files)
    return json.loads(files["loratune.json"])


def setUpModule():
    onnx_runtime.ensure_runtime(BIN)


class FixtureLayouts(unittest.TestCase):
    def test_every_layout_runs_in_onnx_runtime_as_in_torchscript(self):
        rng = np.random.default_rng(0)
        for layout in LAYOUTS:
            with self.subTest(layout=layout):
                classifier = merged(layout)
                out = os.path.join(TMP, layout + ".onnx")
                code, stdout, err = run("export", "--model", classifier, "--output", out)
                self.assertEqual(code, 0, err)
                self.assertIn("ONNX opset 17", stdout)
                model = onnx.load(out)
                onnx.checker.check_model(model, full_check=True)
                self.assertEqual([o.version for o in model.opset_import], [17])
                info = bundle_info(classifier)
                meta = {p.key: p.value for p in model.metadata_props}
                self.assertEqual(json.loads(meta["mean"]), info["mean"])
                self.assertEqual(json.loads(meta["std"]), info["std"])
                self.assertEqual(json.loads(meta["classes"]), info["classes"])
                self.assertEqual(int(meta["image_size"]), info["image_size"])
                self.assertEqual(meta["interpolation"], info["interpolation"])
                size = info["image_size"]
                for batch in (1, 3, 7):  # the export ran batches of 2 and 5
                    x = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
                    got, want = onnx_runtime_outputs(out, x), torchscript(classifier, x)
                    self.assertEqual(got.shape, want.shape)
                    self.assertLess(relative(got, want), TOLERANCE, f"batch {batch}")

    def test_external_data_keeps_tensors_beside_the_model(self):
        classifier = merged("timm_script")
        out = os.path.join(TMP, "external", "timm.onnx")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        code, _, err = run("export", "--model", classifier, "--output", out, "--external-data")
        self.assertEqual(code, 0, err)
        self.assertTrue(os.path.getsize(out + ".data") > os.path.getsize(out))
        onnx.checker.check_model(out, full_check=True)
        x = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
        self.assertLess(relative(onnx_runtime_outputs(out, x), torchscript(classifier, x)), TOLERANCE)


class AdapterOnTheFly(unittest.TestCase):
    def test_base_and_adapter_export_as_their_merge_and_as_features(self):
        layout = "hf_script"
        base, adapter = os.path.join(MODELS, layout + ".pt"), os.path.join(MODELS, "adapter_" + layout)
        x = np.random.default_rng(2).standard_normal((3, 3, 32, 32)).astype(np.float32)
        out = os.path.join(TMP, "on_the_fly.onnx")
        code, _, err = run("export", "--model", base, "--adapter", adapter, "--output", out)
        self.assertEqual(code, 0, err)
        self.assertLess(relative(onnx_runtime_outputs(out, x), torchscript(merged(layout), x)), TOLERANCE)

        features = os.path.join(TMP, "features.onnx")
        code, _, err = run("export", "--model", base, "--adapter", adapter, "--output", features, "--features-only")
        self.assertEqual(code, 0, err)
        merged_features = os.path.join(TMP, "features.pt")
        code, _, err = run("merge", "--base", base, "--adapter", adapter, "--output", merged_features, "--features-only")
        self.assertEqual(code, 0, err)
        got = onnx_runtime_outputs(features, x)
        self.assertEqual(got.shape[1], bundle_info(base)["feature_dim"])
        self.assertLess(relative(got, torchscript(merged_features, x)), TOLERANCE)
        self.assertEqual(onnx.load(features).graph.output[0].name, "features")


class Photos(unittest.TestCase):
    """Real photos preprocessed as the metadata says: ONNX Runtime's top-1 is TorchScript's for every photo."""

    def test_top1_on_the_test_photos(self):
        classifier = merged("timm_trace")
        out = os.path.join(TMP, "photos.onnx")
        code, _, err = run("export", "--model", classifier, "--output", out)
        self.assertEqual(code, 0, err)
        meta = {p.key: p.value for p in onnx.load(out).metadata_props}
        size, resize = int(meta["image_size"]), int(meta["resize_size"])
        mean, std = np.array(json.loads(meta["mean"])), np.array(json.loads(meta["std"]))
        root = os.path.join(FIX, "images", "toy", "val")
        batch = []
        for cls in sorted(os.listdir(root)):
            for name in sorted(os.listdir(os.path.join(root, cls))):
                img = Image.open(os.path.join(root, cls, name)).convert("RGB")
                scale = resize / min(img.size)
                img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BILINEAR)
                left, top = (img.width - size) // 2, (img.height - size) // 2
                a = np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
                batch.append(((a - mean) / std).transpose(2, 0, 1))
        x = np.stack(batch).astype(np.float32)
        self.assertGreaterEqual(len(x), 10)
        got, want = onnx_runtime_outputs(out, x), torchscript(classifier, x)
        self.assertLess(relative(got, want), TOLERANCE)
        self.assertEqual(got.argmax(1).tolist(), want.argmax(1).tolist())


class Refusals(unittest.TestCase):
    def test_an_operator_without_mapping_is_named_with_its_module_and_nothing_is_written(self):
        class Odd(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.proj = torch.nn.Linear(3, 4)

            def forward(self, images):
                return torch.cumsum(self.proj(images.mean((2, 3))), 1)

        class Wrapper(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.odd = Odd()

            def forward(self, images):
                return self.odd(images)

        bundle = os.path.join(TMP, "odd.pt")
        meta = {"format": 1, "kind": "backbone", "blocks": "", "family": "vit", "architecture": "odd",
                "feature_dim": 4, "image_size": 8, "resize_size": 8}
        torch.jit.save(torch.jit.script(Wrapper()), bundle, _extra_files={"loratune.json": json.dumps(meta)})
        out = os.path.join(TMP, "odd.onnx")
        code, stdout, err = run("export", "--model", bundle, "--output", out)
        self.assertEqual(code, 3, err)
        self.assertEqual(err.strip().splitlines(), ["error: ONNX export: aten::cumsum in odd has no ONNX mapping "
                                                    "(an operator the exporter does not map)"])
        self.assertFalse(os.path.exists(out))

    def test_bad_inputs_are_one_line_errors(self):
        out = os.path.join(TMP, "never.onnx")
        adapter = os.path.join(MODELS, "adapter_hf_script")
        code, _, err = run("export", "--model", adapter, "--output", out)
        self.assertEqual(code, 3, err)
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        code, _, err = run("export", "--model", os.path.join(MODELS, "hf_script.pt"), "--output", out, "--features-only")
        self.assertEqual(code, 3, err)
        self.assertIn("--features-only applies with --adapter", err)
        code, _, err = run("export", "--model", os.path.join(MODELS, "hf_script.pt"), "--output", out, "--format", "tflite")
        self.assertEqual(code, 2, err)
        self.assertFalse(os.path.exists(out))


if __name__ == "__main__":
    try:
        unittest.main(argv=[sys.argv[0]] + sys.argv[3:], verbosity=2)
    finally:
        shutil.rmtree(TMP, ignore_errors=True)
