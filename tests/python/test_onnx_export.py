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
    threads = [] if args[0] == "train" else ["--threads", "1"]  # train takes its threads from the config
    p = subprocess.run([BIN, *args, *threads], capture_output=True, text=True, timeout=600)
    return p.returncode, p.stdout, p.stderr


def onnx_runtime_outputs(model, x, optimization="all"):
    return onnx_runtime.run_onnx(BIN, model, x, optimization)


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

    def test_fp16_halves_the_file_and_stays_within_1e_2(self):
        rng = np.random.default_rng(3)
        # ONNX Runtime 1.31's CPU optimizer fails on float16 convolutions at its extended level (its Conv + Mul fusion
        # reads float16 constants as float): MobileCLIP's image tower is checked at the basic level (README says so).
        cases = [(merged(layout), False, "all") for layout in LAYOUTS]
        cases += [(os.path.join(MODELS, "mobileclip_trace.pt"), False, "basic"),
                  (os.path.join(MODELS, "mobileclip_text.pt"), True, "all")]
        for bundle, text, optimization in cases:
            with self.subTest(bundle=os.path.basename(bundle)):
                full, half = os.path.join(TMP, "full.onnx"), os.path.join(TMP, "half.onnx")
                for path, precision in ((full, "fp32"), (half, "fp16")):
                    code, _, err = run("export", "--model", bundle, "--output", path, "--precision", precision)
                    self.assertEqual(code, 0, err)
                onnx.checker.check_model(half, full_check=True)
                def float_bytes(path):  # the weights' bytes (batch-norm statistics stay float32)
                    return sum(len(t.raw_data) for t in onnx.load(path).graph.initializer if t.data_type in (1, 10))
                self.assertLess(float_bytes(half), 0.55 * float_bytes(full))
                meta = {p.key: p.value for p in onnx.load(half).metadata_props}
                self.assertEqual(meta["precision"], "fp16")
                if text:
                    x = np.zeros((3, 77), dtype=np.int64)
                    for r in range(3):
                        x[r, 0], x[r, 1:4 + r], x[r, 4 + r] = 520, rng.integers(1, 520, 3 + r), 521
                else:
                    size = bundle_info(bundle)["image_size"]
                    x = rng.standard_normal((3, 3, size, size)).astype(np.float32)
                got, want = onnx_runtime_outputs(half, x, optimization), torchscript(bundle, x)
                self.assertEqual(got.dtype, np.float32)
                self.assertLess(relative(got, want), 1e-2)

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


class WebPage(unittest.TestCase):
    """`export --format web` in a real browser (Debian's headless Chromium) from a loopback server: photos dropped on
    the page are classified in the browser with onnxruntime-web and the page's top-1 is `loratune predict`'s, Korean
    class names included; a screenshot is kept in test-artifacts/."""

    def classifier_with_korean_classes(self):
        toy = os.path.join(FIX, "images", "toy")
        run_dir = os.path.join(TMP, "web_run")
        config = {"model": os.path.join(MODELS, "hf_script.pt"), "output_dir": run_dir, "epochs": 6, "batch_size": 4,
                  "threads": 2, "data": {"train": os.path.join(toy, "train"), "val": os.path.join(toy, "val")},
                  "optim": {"lr": 0.01}}
        config_path = run_dir + ".json"
        with open(config_path, "w") as f:
            json.dump(config, f)
        code, _, err = run("train", "--config", config_path)
        self.assertEqual(code, 0, err)
        merged_path = os.path.join(TMP, "web_classifier.pt")
        code, _, err = run("merge", "--base", config["model"], "--adapter", os.path.join(run_dir, "adapter"),
                           "--output", merged_path)
        self.assertEqual(code, 0, err)
        return merged_path, os.path.join(toy, "val")

    def test_dropped_photos_get_predicts_classes_in_the_browser(self):
        import browser  # Chromium over the DevTools protocol (python3-websocket)
        classifier, photos = self.classifier_with_korean_classes()
        site = os.path.join(TMP, "site")
        code, stdout, err = run("export", "--model", classifier, "--format", "web", "--output", site)
        self.assertEqual(code, 0, err)
        self.assertEqual(sorted(os.listdir(site)), ["index.html", "model.onnx", "ort"])
        # Photos predict is sure about (top-1 at least 0.2 above the runner-up): canvas and OpenCV resize alike but
        # not bit for bit.
        code, stdout, err = run("predict", "--model", classifier, photos, "-f", "json")
        self.assertEqual(code, 0, err)
        clear = [p for p in json.loads(stdout) if p["top"][0]["probability"] - p["top"][1]["probability"] >= 0.2]
        self.assertGreaterEqual(len(clear), 3)
        self.assertTrue(any(p["top"][0]["label"] == "빨간_사각형" for p in clear), "a Korean class among them")
        dropped = os.path.join(site, "dropped")
        os.makedirs(dropped)
        for k, p in enumerate(clear):
            shutil.copy(p["path"], os.path.join(dropped, f"{k}.png"))
        server = subprocess.Popen([sys.executable, "-m", "http.server", "0", "--bind", "127.0.0.1", "--directory", site],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            port = int(server.stdout.readline().split("port ")[1].split()[0])
            with browser.Browser() as b:
                b.open(f"http://127.0.0.1:{port}/index.html")
                state = b.js("new Promise(r => { const t = setInterval(() => { if (document.body.dataset.ready) "
                             "{ clearInterval(t); r(document.body.dataset.ready); } }, 50); })")
                self.assertEqual(state, "1", b.js("document.getElementById('status').textContent"))
                names = json.dumps([f"{k}.png" for k in range(len(clear))])
                b.js(f"""(async () => {{
                    const dt = new DataTransfer();
                    for (const name of {names}) {{
                      const blob = await (await fetch("dropped/" + name)).blob();
                      dt.items.add(new File([blob], name, {{type: "image/png"}}));
                    }}
                    document.getElementById("drop").dispatchEvent(new DragEvent("drop", {{dataTransfer: dt}}));
                  }})()""")
                b.js(f"new Promise(r => {{ const t = setInterval(() => {{ if (document.body.dataset.classified == "
                     f"'{len(clear)}') {{ clearInterval(t); r(); }} }}, 50); }})")
                shown = b.js("Object.fromEntries([...document.querySelectorAll('.result')]"
                             ".map(e => [e.dataset.file, e.dataset.top1]))")
                listed = b.js("[...document.querySelectorAll('.result .name')].map(e => e.textContent)")
                artifacts = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(BIN))), "test-artifacts")
                b.screenshot(os.path.join(artifacts, "onnx_web_page.png"))
        finally:
            server.terminate()
            server.wait()
        self.assertEqual(shown, {f"{k}.png": p["top"][0]["label"] for k, p in enumerate(clear)})
        self.assertIn("빨간_사각형", listed)


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
        # Outputs never replace inputs or other files: the model itself, a photo, a folder export did not write.
        model = shutil.copy(os.path.join(MODELS, "hf_script.pt"), os.path.join(TMP, "mine.pt"))
        before = open(model, "rb").read()
        code, _, err = run("export", "--model", model, "--output", model)
        self.assertEqual(code, 3, err)
        self.assertIn("is the input", err)
        photo = shutil.copy(os.path.join(FIX, "images", "toy", "val", "circle", "000.png"), os.path.join(TMP, "p.png"))
        code, _, err = run("export", "--model", model, "--output", photo)
        self.assertEqual(code, 3, err)
        self.assertIn("exists and is not an .onnx file", err)
        folder = os.path.join(TMP, "my_photos")
        os.makedirs(folder)
        shutil.copy(photo, folder)
        code, _, err = run("export", "--model", model, "--format", "web", "--output", folder)
        self.assertEqual(code, 3, err)
        self.assertIn("exists and is not a folder export --format web wrote", err)
        self.assertEqual(os.listdir(folder), ["p.png"])
        self.assertEqual(open(model, "rb").read(), before)


if __name__ == "__main__":
    try:
        unittest.main(argv=[sys.argv[0]] + sys.argv[3:], verbosity=2)
    finally:
        shutil.rmtree(TMP, ignore_errors=True)
