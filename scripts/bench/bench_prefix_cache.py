#!/usr/bin/env python3
"""Training with and without the frozen-prefix cache on an MCi-S0-sized model (random weights, MobileCLIP layout:
stages 2/6/10/2, dims 64-512, 256 px, adapters on q/v of the last stage). Augmentation off (the cache needs it off).
Prints the training rate of the epochs after the first (which fills the cache) for both, and the speed-up.

usage: bench_prefix_cache.py [--out DIR] [--epochs N]
"""
import argparse
import json
import os
import subprocess
import sys

import numpy as np
import torch
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [os.path.join(ROOT, "scripts", "export"), os.path.join(ROOT, "tests", "fixtures")]
import loratune_export as lx  # noqa: E402
import apple_mobileclip as export_mobileclip  # noqa: E402
import tiny_mobileclip as tm  # noqa: E402


class S0:
    dims = (64, 128, 256, 512)
    depths = (2, 6, 10, 2)
    heads = 16
    embed = 512
    image_size = 256


def make_model(path):
    if os.path.exists(path):
        return
    torch.manual_seed(0)
    tm.ImageConfig.image_size = S0.image_size
    encoder = tm.calibrate_batchnorm(tm.ImageEncoder(S0), batches=2)
    meta = {"family": "mobileclip", "architecture": "mobileclip_mci", "name": "MCi-S0-sized (random weights)",
            "feature_dim": S0.embed, "image_size": 256, "resize_size": 256, "interpolation": "bilinear",
            "mean": [0.0] * 3, "std": [1.0] * 3, "module_prefix": ""}
    lx.export_bundle(export_mobileclip.MobileCLIPImage(encoder), meta, path, mode="trace")


def make_photos(folder, per_class=32):
    if os.path.isdir(folder):
        return
    rng = np.random.default_rng(0)
    for c in range(3):
        d = os.path.join(folder, f"class_{c}")
        os.makedirs(d)
        for i in range(per_class):
            img = np.clip(rng.normal(80 + 60 * c, 40, (256, 256, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(os.path.join(d, f"{i:03d}.jpg"), quality=90)


def train(binary, out, model, photos, cache, epochs):
    run_dir = os.path.join(out, f"run_cache_{cache}")
    subprocess.run(["rm", "-rf", run_dir], check=True)
    cmd = [binary, "train", "--set", f"model={model}", "--set", f"data.train={photos}", "--set", "data.val_fraction=0.1",
           "--set", "data.augment.enabled=false", "--set", f"data.prefix_cache={cache}", "--set", f"epochs={epochs}",
           "--set", "batch_size=16", "--set", "precision=fp32", "--set", f"output_dir={run_dir}",
           "--set", "log_every_steps=1", "--set", "gradient_checkpointing=false"]
    subprocess.run(cmd, check=True, capture_output=True)
    rates, first_epoch_steps = [], None
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            j = json.loads(line)
            if j["type"] == "train" and j["epoch"] > 1:
                rates.append(j["images_per_second"])
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    return sorted(rates)[len(rates) // 2], summary["seconds"], summary["best_val_top1"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "build", "bench_prefix"))
    p.add_argument("--binary", default=os.path.join(ROOT, "build", "bin", "loratune"))
    p.add_argument("--epochs", type=int, default=4)
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    model = os.path.join(a.out, "mci_s0_sized.pt")
    photos = os.path.join(a.out, "photos")
    make_model(model)
    make_photos(photos)
    results = {}
    for cache in ("off", "memory", "off", "memory"):  # interleaved, medians of the two runs each
        results.setdefault(cache, []).append(train(a.binary, a.out, model, photos, cache, a.epochs))
    print("| prefix cache | train images/s (epochs 2+) | wall time | best val top-1 |")
    print("|---|---|---|---|")
    for cache, runs in results.items():
        rate = sorted(r[0] for r in runs)[0] if len(runs) == 1 else sum(r[0] for r in runs) / len(runs)
        wall = sum(r[1] for r in runs) / len(runs)
        print(f"| {cache} | {rate:.1f} | {wall:.1f} s | {100 * runs[0][2]:.1f}% |")
    speedup = (sum(r[0] for r in results["memory"]) / len(results["memory"])) / (sum(r[0] for r in results["off"]) / len(results["off"]))
    print(f"speed-up of later epochs with the cache: {speedup:.2f}x")


if __name__ == "__main__":
    main()
