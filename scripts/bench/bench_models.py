"""Models and data for the benchmarks: transformers-layout ViTs (random init) as loratune bundles, the same models in
eager PyTorch with a hand-written LoRA layer (what a Python user runs), and a JPEG photo folder."""
import os
import sys

import numpy as np
import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [os.path.join(ROOT, "scripts", "export"), os.path.join(ROOT, "tests", "fixtures")]
import loratune_export as lx  # noqa: E402
import tiny_vits  # noqa: E402


def config(name):
    sizes = {"vit_b16": (768, 12, 12, 3072), "vit_s16": (384, 12, 6, 1536)}[name]
    return type(name, (), dict(image_size=224, patch_size=16, hidden=sizes[0], layers=sizes[1], heads=sizes[2],
                               mlp=sizes[3]))


def eager_model(name):
    return lx.HFViT(tiny_vits.HFStyleViT(config(name))).eval()


def make_bundle(name, path):
    if os.path.exists(path):
        return path
    torch.manual_seed(0)
    meta = {"family": "vit", "architecture": "hf_vit", "name": f"{name} (random init)", "feature_dim": config(name).hidden,
            "image_size": 224, "resize_size": 256, "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.5] * 3,
            "module_prefix": ""}
    lx.export_bundle(eager_model(name), meta, path, mode="trace")
    return path


class LoRALinear(nn.Module):
    """y = W x + b + s * B(A(x)), as PEFT's LoRA layer (no dropout)."""

    def __init__(self, base, rank=8, alpha=16):
        super().__init__()
        self.base = base
        self.lora_A = nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=5 ** 0.5)
        nn.init.zeros_(self.lora_B.weight)
        self.scale = alpha / rank

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(x)) * self.scale


def eager_with_lora(name, bundle_path):
    model = eager_model(name)
    model.load_state_dict(torch.jit.load(bundle_path).state_dict())
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in model.vit.encoder.layer:
        att = layer.attention.attention
        att.query, att.value = LoRALinear(att.query), LoRALinear(att.value)
    return model


def make_jpeg_folder(path, classes=10, per_class=60):
    """Photo-sized JPEGs (500x375) made from Fashion-MNIST images."""
    if os.path.isdir(path):
        return path
    import gzip

    from PIL import Image

    with gzip.open("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    rng = np.random.default_rng(0)
    for c in range(classes):
        d = os.path.join(path, f"class_{c}")
        os.makedirs(d, exist_ok=True)
        for i in range(per_class):
            base = Image.fromarray(images[c * per_class + i]).resize((500, 375), Image.BILINEAR).convert("RGB")
            noisy = np.clip(np.asarray(base, np.int16) + rng.integers(-20, 20, (375, 500, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(noisy).save(os.path.join(d, f"{i:03d}.jpg"), quality=90)
    return path
