"""The export scripts' conversion code on the layout-faithful fixture models (transformers cannot be installed here;
test_upstream_models.py runs the timm, torchvision and MobileCLIP scripts on the real packages), and the torchvision
script's custom architecture end to end."""
import os
import shutil
import sys
import tempfile
import unittest

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [os.path.join(ROOT, "scripts", "export"), os.path.join(ROOT, "tests", "fixtures")]

import hf_vit  # noqa: E402
import loratune_export as lx  # noqa: E402
import timm_vit  # noqa: E402
import tiny_vits  # noqa: E402
import torchvision_vit  # noqa: E402

TMP = tempfile.mkdtemp(prefix="loratune_export_")


class ExportScripts(unittest.TestCase):
    def test_hf_metadata_and_export(self):
        processor = {"size": {"height": 32, "width": 32}, "resample": 2, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
        model = tiny_vits.HFStyleViT()
        model.config = type("Config", (), {"hidden_size": 32})()
        path = os.path.join(TMP, "hf.pt")
        hf_vit.export(model, processor, "tiny", path)
        meta = lx.read_metadata(path)
        self.assertEqual(meta["architecture"], "hf_vit")
        self.assertEqual((meta["image_size"], meta["resize_size"], meta["interpolation"]), (32, 32, "bilinear"))
        self.assertEqual(meta["blocks"], "vit.encoder.layer")
        m = torch.jit.load(path)
        self.assertEqual(tuple(m(torch.randn(1, 3, 32, 32)).shape), (1, 32))

    def test_timm_metadata_and_export(self):
        model = tiny_vits.TimmStyleViT()
        model.num_features = 32
        cfg = {"input_size": (3, 32, 32), "crop_pct": 0.875, "interpolation": "bicubic", "mean": (0.5,) * 3, "std": (0.5,) * 3}
        path = os.path.join(TMP, "timm.pt")
        timm_vit.export(model, cfg, "tiny", path)
        meta = lx.read_metadata(path)
        self.assertEqual((meta["image_size"], meta["resize_size"], meta["module_prefix"]), (32, 36, "model."))
        self.assertEqual(meta["blocks"], "model.blocks")

    def test_torchvision_random_init_end_to_end(self):
        path = os.path.join(TMP, "tv.pt")
        torchvision_vit.main(["--arch", "custom", "--random-init", "--image-size", "28", "--patch-size", "4", "--layers", "2", "--heads", "2",
                              "--hidden", "16", "--mlp", "32", "--output", path])
        meta = lx.read_metadata(path)
        self.assertEqual((meta["feature_dim"], meta["image_size"], meta["blocks"]), (16, 28, "model.encoder.layers"))
        m = torch.jit.load(path)
        self.assertNotIn("_native_multi_head_attention", str(m.inlined_graph))
        x = torch.randn(2, 3, 28, 28, requires_grad=True)
        m(x).sum().backward()  # trainable: the traced graph has a backward
        self.assertIsNotNone(x.grad)


if __name__ == "__main__":
    result = unittest.main(argv=[sys.argv[0], "-v"], exit=False).result
    shutil.rmtree(TMP, ignore_errors=True)
    failed = len(result.failures) + len(result.errors)
    print(f"{result.testsRun - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)
