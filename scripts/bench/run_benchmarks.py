#!/usr/bin/env python3
"""loratune against Python torch on this CPU, interleaved in one run (the machine is noisy: compare within a run).

 1. training step time and peak RSS, ViT-B/16 (transformers layout, 224 px, LoRA r8 on query/value, AdamW) at
    batch 2, fp32 and bf16: loratune on the TorchScript bundle vs eager PyTorch with a hand-written LoRA layer;
 2. peak RSS with and without gradient checkpointing, batch 8 (loratune);
 3. photo loader images/s (random resized crop 224 + flip, JPEGs at 500x375, 2 workers) vs the ViT-S/16 training rate
    at batch 16, and vs torchvision ImageFolder + DataLoader.

usage: run_benchmarks.py [--out DIR] [--rounds N] [--report FILE]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
PYTHON = "/usr/bin/python3"
sys.path.insert(0, HERE)
import bench_models  # noqa: E402


def measure(cmd):
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "build", "bench"))
    p.add_argument("--bench-binary", default=os.path.join(ROOT, "build", "bin", "loratune_bench"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--report")
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    vit_b = bench_models.make_bundle("vit_b16", os.path.join(a.out, "vit_b16.pt"))
    vit_s = bench_models.make_bundle("vit_s16", os.path.join(a.out, "vit_s16.pt"))
    photos = bench_models.make_jpeg_folder(os.path.join(a.out, "jpegs"))
    lines = []

    def say(text=""):
        print(text, flush=True)
        lines.append(text)

    say("## 1. training step, ViT-B/16 at batch 2 (median s/step over 6 steps after 2 warm-up; median of rounds)")
    say("| precision | loratune s/step | python s/step | ratio | loratune peak RSS | python peak RSS | RSS ratio |")
    say("|---|---|---|---|---|---|---|")
    for precision in ("fp32", "bf16"):
        cpp, py = [], []
        for r in range(a.rounds):
            runs = [("cpp", [a.bench_binary, "step", f"model={vit_b}", "batch=2", f"precision={precision}", "checkpoint=0", "steps=8"]),
                    ("py", [PYTHON, os.path.join(HERE, "python_step.py"), "vit_b16", vit_b, "2", precision, "8"])]
            for who, cmd in (runs if r % 2 == 0 else runs[::-1]):
                (cpp if who == "cpp" else py).append(measure(cmd))
        ct = statistics.median(m["median_step_s"] for m in cpp)
        pt = statistics.median(m["median_step_s"] for m in py)
        cr = statistics.median(m["peak_rss"] for m in cpp)
        pr = statistics.median(m["peak_rss"] for m in py)
        say(f"| {precision} | {ct:.3f} | {pt:.3f} | {ct / pt:.2f} | {cr / 2**20:.0f} MB | {pr / 2**20:.0f} MB | {cr / pr:.2f} |")

    say("")
    say("## 2. gradient checkpointing, ViT-B/16 at batch 8, fp32 (loratune)")
    results = {0: [], 1: []}
    for r in range(max(2, a.rounds - 1)):
        for ckpt in ((0, 1) if r % 2 == 0 else (1, 0)):
            results[ckpt].append(measure([a.bench_binary, "step", f"model={vit_b}", "batch=8", "precision=fp32", f"checkpoint={ckpt}", "steps=4"]))
    off_rss = statistics.median(m["peak_rss"] for m in results[0])
    on_rss = statistics.median(m["peak_rss"] for m in results[1])
    off_t = statistics.median(m["median_step_s"] for m in results[0])
    on_t = statistics.median(m["median_step_s"] for m in results[1])
    say("| checkpointing | peak RSS | s/step |")
    say("|---|---|---|")
    say(f"| off | {off_rss / 2**20:.0f} MB | {off_t:.2f} |")
    say(f"| on | {on_rss / 2**20:.0f} MB | {on_t:.2f} |")
    say(f"peak RSS ratio on/off: {on_rss / off_rss:.2f}; step time ratio on/off: {on_t / off_t:.2f}")

    say("")
    say("## 3. data loader, 600 JPEGs 500x375, random resized crop 224 + flip, batch 16, 2 workers")
    train = statistics.median(measure([a.bench_binary, "step", f"model={vit_s}", "batch=16", "precision=fp32", "checkpoint=0",
                                      "steps=5"])["median_step_s"]
                              for _ in range(max(1, a.rounds - 1)))
    train_rate = 16 / train
    cpp, py = [], []
    for r in range(a.rounds):
        runs = [("cpp", [a.bench_binary, "loader", f"folder={photos}", "batch=16", "workers=2", "batches=60"]),
                ("py", [PYTHON, os.path.join(HERE, "python_loader.py"), photos, "16", "2", "60"])]
        for who, cmd in (runs if r % 2 == 0 else runs[::-1]):
            (cpp if who == "cpp" else py).append(measure(cmd)["images_per_s"])
    c, t = statistics.median(cpp), statistics.median(py)
    say("| | images/s |")
    say("|---|---|")
    say(f"| ViT-S/16 LoRA training (fp32, batch 16) | {train_rate:.1f} |")
    say(f"| loratune loader | {c:.1f} |")
    say(f"| torchvision ImageFolder + DataLoader | {t:.1f} |")
    say(f"loader / training rate: {c / train_rate:.1f}x; loratune / torchvision loader: {c / t:.2f}x")
    if a.report:
        with open(a.report, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
