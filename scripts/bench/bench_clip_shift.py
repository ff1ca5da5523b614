#!/usr/bin/env python3
"""CLIP adaptation under a distribution shift (issue: MobileCLIP2 and both towers), measured with the loratune CLI.

1. A small CLIP (open_clip's own CLIP class: ViT 32 px / patch 8, 4 layers x 128; text 4 layers x 128, context 16)
   is pretrained here with open_clip's contrastive loss on captioned Fashion-MNIST ("a photo of a sneaker.", ...),
   original rendering (dark background), and saved as an open_clip checkpoint folder: loratune imports it natively.
2. "Your photos": the same classes rendered differently (line drawings), 100 per class from the training split. Scored on the official test split in both renderings (target and original: forgetting).
3. Rows, each over --seeds: zero-shot; cross-entropy LoRA from the zero-shot head; contrastive LoRA on both towers
   (`loss: contrastive`, FLYP: a caption-style prompt of its class per image); and each merged with WiSE-FT
   strength 0.5 (`merge --strength 0.5`: both towers, and the head made anew from the merged text tower). Validation: 10% of "your photos". Time per step and peak memory come from
   each run's summary.json.

usage: /usr/bin/python3 scripts/bench/bench_clip_shift.py [--work build/bench_clip_shift] [--seeds 0 1 2]
Needs ../shared/upstream (open_clip 4.2 and the stand-ins that run it on Debian's torch 1.13). The pretrained folder
is reused when present (delete it to pretrain again).
"""
import argparse
import gzip
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np
import torch
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SOURCE = "/usr/share/datasets/fashion-mnist"
CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
CAPTIONS = ["a photo of a {}.", "a picture of a {}.", "a {}.", "a product photo of a {}.", "a photo of the {}, a "
            "piece of clothing.", "an image of a {}."]
SIZE = 32
CLIP_CFG = {"embed_dim": 128,
            "vision_cfg": {"image_size": SIZE, "layers": 4, "width": 128, "head_width": 32, "patch_size": 8},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 4}}
MEAN, STD = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]


def load_split(split):
    prefix = "train" if split == "train" else "t10k"
    with gzip.open(os.path.join(SOURCE, f"{prefix}-images-idx3-ubyte.gz")) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(os.path.join(SOURCE, f"{prefix}-labels-idx1-ubyte.gz")) as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)
    return images, labels


def render(images, shifted):
    """uint8 [N, 32, 32, 3]: the original rendering (grey on black), or the shifted one: line drawings (the local
    contrast of each pixel against its 3x3 mean, amplified: outlines and seams, no shading)."""
    x = torch.from_numpy(np.array(images)).float().unsqueeze(1) / 255.0
    x = torch.nn.functional.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False).clamp(0, 1)
    if shifted:
        x = (x - torch.nn.functional.avg_pool2d(x, 3, 1, 1)).abs().mul(3).clamp(0, 1)
    return (x.repeat(1, 3, 1, 1).permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()


def write_folder(folder, images, labels, per_class, seed):
    rng = np.random.default_rng(seed)
    for k, name in enumerate(CLASSES):
        idx = np.flatnonzero(labels == k)
        if per_class:
            idx = np.sort(rng.choice(idx, size=per_class, replace=False))
        os.makedirs(os.path.join(folder, name), exist_ok=True)
        for i in idx:
            Image.fromarray(images[i], "RGB").save(os.path.join(folder, name, f"{i:05d}.png"))


def make_data(work, test_per_class):
    done = os.path.join(work, "data", ".done")
    if os.path.exists(done):
        return
    train_x, train_y = load_split("train")
    test_x, test_y = load_split("test")
    write_folder(os.path.join(work, "data", "target_train"), render(train_x, True), train_y, 100, 1)
    write_folder(os.path.join(work, "data", "target_test"), render(test_x, True), test_y, test_per_class, 2)
    write_folder(os.path.join(work, "data", "original_test"), render(test_x, False), test_y, test_per_class, 2)
    open(done, "w").close()


def pretrain(work, upstream, epochs):
    """The small CLIP, trained on the original rendering of the training split; saved as an open_clip folder."""
    folder = os.path.join(work, "clip")
    if os.path.exists(os.path.join(folder, "open_clip_model.safetensors")):
        return folder
    sys.path[:0] = [os.path.join(upstream, "open_clip", "src"), os.path.join(upstream, "torch113_standins"),
                    os.path.join(ROOT, "tests", "python")]
    import open_clip_torch113  # noqa: F401
    import open_clip
    import safetensors_lite

    torch.manual_seed(0)
    model = open_clip.model.CLIP(**CLIP_CFG)
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=CLIP_CFG["text_cfg"]["context_length"])
    caption_tokens = torch.stack([tokenizer([c.format(name) for c in CAPTIONS]) for name in CLASSES])  # [10, T, 16]
    train_x, train_y = load_split("train")
    images = torch.from_numpy(render(train_x, False)).permute(0, 3, 1, 2).float().div(255)
    images = (images - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    labels = torch.from_numpy(train_y)
    loss_fn = open_clip.loss.ClipLoss()
    batch = 256
    steps = epochs * (len(images) // batch)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(0)
    model.train()
    start, step = time.time(), 0
    for epoch in range(epochs):
        order = torch.randperm(len(images), generator=gen)
        for b in range(len(images) // batch):
            idx = order[b * batch:(b + 1) * batch]
            template = torch.randint(len(CAPTIONS), (batch,), generator=gen)
            text = caption_tokens[labels[idx], template]
            img_f, txt_f, scale = model(images[idx], text)
            loss = loss_fn(img_f, txt_f, scale)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % 50 == 0:
                print(f"  pretrain step {step}/{steps} loss {loss.item():.3f} ({time.time() - start:.0f} s)", flush=True)
    os.makedirs(folder, exist_ok=True)
    safetensors_lite.save({k: v.detach().contiguous() for k, v in model.state_dict().items()},
                          os.path.join(folder, "open_clip_model.safetensors"))
    with open(os.path.join(folder, "open_clip_config.json"), "w") as f:
        json.dump({"model_cfg": CLIP_CFG, "preprocess_cfg": {"mean": MEAN, "std": STD, "interpolation": "bilinear"}}, f)
    with gzip.open(os.path.join(upstream, "open_clip_vocab", "src", "open_clip", "bpe_simple_vocab_16e6.txt.gz")) as f:
        with open(os.path.join(folder, "merges.txt"), "wb") as out:
            out.write(f.read())
    print(f"pretrained in {time.time() - start:.0f} s ({steps} steps)")
    return folder


def cell(values):
    """Fractions over seeds as a table cell: mean ± standard deviation, in percent."""
    values = [100 * v for v in values]
    return f"{statistics.mean(values):.1f}" + (f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else "")


def timing_cells(timing):
    """(seconds per step, peak bytes) over seeds as two cells; empty for rows without training."""
    if not timing:
        return "", ""
    return f"{statistics.mean(x[0] for x in timing):.3f}", f"{max(x[1] for x in timing) / 2**20:.0f} MiB"


def publish(table, report):
    print(table)
    if report:
        with open(report, "w") as f:
            f.write(table + "\n")


def run(*args):
    p = subprocess.run(list(args), capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(args)} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p.stdout


def evaluate(binary, work, name, model_args, data):
    out = os.path.join(work, "eval", name)
    run(binary, "eval", *model_args, "--data", data, "--output", out, "--threads", "2")
    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f)["top1"]


# (key, table label, settings over the shared ones). Learning rates of SSF, VPT and AdaptFormer chosen on the
# validation split of the target photos (seed 0): SSF 3e-3 / 1e-2 / 3e-2 / 1e-1 gave 42 / 52 / 58 / 59%, VPT 3e-3 /
# 1e-2 / 3e-2 51 / 54 / 52%, AdaptFormer (bottleneck 16) 3e-3 / 1e-2 / 3e-2 / 1e-1 47 / 56 / 58 / 54%. DoRA takes
# LoRA's, VPT-shallow VPT-deep's; full fine-tuning 1e-4, a tenth of LoRA's (not swept).
METHODS = [("ce", "cross-entropy LoRA (zero-shot head)", {}),
           ("flyp", "contrastive LoRA, both towers (FLYP)", {"loss": "contrastive"}),
           ("ssf", "cross-entropy SSF q/v (zero-shot head)", {"lora": {"variant": "ssf"}, "optim": {"lr": 1e-1}}),
           ("vpt", "cross-entropy VPT-deep, 10 tokens (zero-shot head)", {"method": "vpt", "optim": {"lr": 1e-2}}),
           ("adaptformer", "cross-entropy AdaptFormer, bottleneck 16 (zero-shot head)",
            {"method": "adaptformer", "adaptformer": {"bottleneck": 16}, "optim": {"lr": 3e-2}}),
           ("dora", "cross-entropy DoRA q/v (zero-shot head)",
            {"lora": {"rank": 8, "alpha": 16, "dropout": 0.0, "variant": "dora"}}),
           ("vpt_shallow", "cross-entropy VPT-shallow, 10 tokens (zero-shot head)",
            {"method": "vpt", "vpt": {"deep": False}, "optim": {"lr": 1e-2}}),
           ("full", "cross-entropy full fine-tuning (zero-shot head)", {"method": "full", "optim": {"lr": 1e-4}})]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--binary", default=os.path.join(ROOT, "build", "bin", "loratune"))
    p.add_argument("--upstream", default=os.path.join(ROOT, "..", "shared", "upstream"))
    p.add_argument("--work", default=os.path.join(ROOT, "build", "bench_clip_shift"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--pretrain-epochs", type=int, default=3)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--test-per-class", type=int, default=300)
    p.add_argument("--report", help="also write the table (markdown) here")
    p.add_argument("--methods", nargs="+", choices=[m[0] for m in METHODS], default=[m[0] for m in METHODS])
    args = p.parse_args()
    work = os.path.abspath(args.work)
    make_data(work, args.test_per_class)
    clip = pretrain(work, os.path.abspath(args.upstream), args.pretrain_epochs)
    model = os.path.join(work, "clip.pt")
    if not os.path.exists(model):
        run(args.binary, "import", clip, "--output", model)
    data = {k: os.path.join(work, "data", k) for k in ("target_train", "target_test", "original_test")}
    shutil.rmtree(os.path.join(work, "eval"), ignore_errors=True)

    rows = {"zero-shot": {"target": [], "original": []}}
    for split in ("target", "original"):
        rows["zero-shot"][split].append(
            evaluate(args.binary, work, "zero_shot_" + split, ["--model", model, "--zero-shot"], data[split + "_test"]))
    timing = {}
    methods = [m for m in METHODS if m[0] in args.methods]
    for seed in args.seeds:
        for key, label, settings in methods:
            run_dir = os.path.join(work, f"{key}_lora_seed{seed}")
            shutil.rmtree(run_dir, ignore_errors=True)
            config = {"model": model,
                      "data": {"train": data["target_train"], "val": None, "val_fraction": 0.1, "workers": 2},
                      "head": {"init": "zero_shot"}, "epochs": args.epochs, "batch_size": 32, "precision": "fp32",
                      "seed": seed, "threads": 2, "optim": {"lr": 1e-3},
                      "lora": {"rank": 8, "alpha": 16, "dropout": 0.1}, "output_dir": run_dir, **settings}
            with open(run_dir + ".json", "w") as f:
                json.dump(config, f)
            run(args.binary, "train", "--config", run_dir + ".json")
            with open(os.path.join(run_dir, "summary.json")) as f:
                summary = json.load(f)
            timing.setdefault(label, []).append(
                (config["batch_size"] / summary["train_images_per_second"], summary["peak_memory_bytes"]))
            wise = settings.get("method") not in ("vpt", "adaptformer")  # they go in whole: no strength
            merged = os.path.join(work, f"{key}_lora_seed{seed}_wise.pt")
            if wise:
                run(args.binary, "merge", "--base", model, "--adapter", os.path.join(run_dir, "adapter"), "--output",
                    merged, "--strength", "0.5")
            for split in ("target", "original"):
                test = data[split + "_test"]
                rows.setdefault(label, {"target": [], "original": []})[split].append(
                    evaluate(args.binary, work, f"{key}_{seed}_{split}", ["--model", model, "--adapter",
                                                                         os.path.join(run_dir, "adapter")], test))
                if wise:
                    rows.setdefault(f"{label} + WiSE-FT 0.5", {"target": [], "original": []})[split].append(
                        evaluate(args.binary, work, f"{key}_wise_{seed}_{split}", ["--model", merged], test))

    lines = ["| method | target rendering top-1 (%) | original rendering top-1 (%) | s / step (32 images) | peak memory |",
             "|---|---|---|---|---|"]
    for name, r in rows.items():
        step, rss = timing_cells(timing.get(name, []))
        lines.append(f"| {name} | {cell(r['target'])} | {cell(r['original'])} | {step} | {rss} |")
    publish("\n".join(lines), args.report)

if __name__ == "__main__":
    main()
