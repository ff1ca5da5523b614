#!/usr/bin/env python3
"""Quantised frozen weights (frozen_dtype int8 / nf4) on this machine's CPU, measured in one run:

1. ViT-B/16 and ViT-L/16 (timm, random weights, exported from ../shared/upstream/timm): LoRA r8 q/v training steps at
   a small batch, fp32 compute, gradient checkpointing on, for frozen weights fp32 / int8 / nf4: median step time,
   peak tensor bytes (loratune's allocator count) and peak RSS, with ratios to fp32; beside them what `loratune plan`
   predicts for the same run.
2. Quality (--quality): the adaptation benchmark's backbone and photos (scripts/demo/run_demo.py, profile demo),
   LoRA trained on the fp32 / int8 / nf4 base, 3 seeds; held-out top-1 of the adapter on the quantised base it was
   trained on (unmerged) and folded into the full-precision base (merged, as `loratune merge` writes it).

  /usr/bin/python3 scripts/bench/bench_quantized.py [--batch 2] [--steps 5] [--models b,l] [--quality]
Run after `bash scripts/build.sh`; --quality after the demo (`bash scripts/demo.sh`) made demo/.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_memory_plan import export  # noqa: E402  (a random-weight timm ViT from ../shared/upstream/timm)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODELS = {"b": ("ViT-B/16", "vit_base_patch16_224"), "l": ("ViT-L/16", "vit_large_patch16_224")}
FORMATS = ("fp32", "int8", "nf4")


def step(model, batch, steps, fmt):
    args = [os.path.join(ROOT, "build", "bin", "loratune_bench"), "step", f"model={model}", f"batch={batch}",
            "precision=fp32", "checkpoint=1", f"steps={steps}"]
    if fmt != "fp32":
        args.append(f"frozen={fmt}")
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def planned(model, batch, fmt):
    out = subprocess.run([os.path.join(ROOT, "build", "bin", "loratune"), "plan", "--json", "--classes", "10",
                          "--set", f"model={model}", "--set", "data.train=-", "--set", "lora.dropout=0",
                          "--set", f"batch_size={batch}", "--set", "gradient_checkpointing=true",
                          "--set", "precision=fp32", "--set", "threads=2", "--set", f"frozen_dtype={fmt}"],
                         check=True, capture_output=True, text=True).stdout
    plan = json.loads(out)
    frozen = sum(item["bytes"] for item in plan["items"] if item["name"].startswith("frozen weights"))
    return plan["total"], frozen


def speed_and_memory(a):
    print(f"batch {a.batch}, fp32 compute, gradient checkpointing, LoRA r8 q/v, median of {a.steps} steps "
          "after warm-up")
    print("| model | frozen weights | planned frozen | step (s) | peak tensors | planned peak | peak RSS | "
          "time vs fp32 | tensors vs fp32 | RSS vs fp32 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for key in a.models.split(","):
        name, timm_name = MODELS[key]
        model = export(timm_name, os.path.join(a.work, timm_name + ".pt"))
        base = None
        for fmt in FORMATS:
            r = step(model, a.batch, a.steps, fmt)
            total, frozen = planned(model, a.batch, fmt)
            base = base or r
            print(f"| {name} | {fmt} | {frozen / 2**20:.0f} MB | {r['median_step_s']:.2f} | "
                  f"{r['peak_tensor_bytes'] / 2**20:.0f} MB | {total / 2**20:.0f} MB | {r['peak_rss'] / 2**20:.0f} MB | "
                  f"{r['median_step_s'] / base['median_step_s']:.2f} | "
                  f"{r['peak_tensor_bytes'] / base['peak_tensor_bytes']:.2f} | {r['peak_rss'] / base['peak_rss']:.2f} |",
                  flush=True)


def quality(a):
    demo = os.path.join(ROOT, "demo")
    backbone = os.path.join(demo, "models", "fmnist_vit_pretrained_demo.pt")
    photos = os.path.join(demo, "data", "photos")
    binary = os.path.join(ROOT, "build", "bin", "loratune")
    if not os.path.exists(backbone):
        sys.exit(f"{backbone} is missing: run `bash scripts/demo.sh` first")
    work = os.path.join(a.work, "quality")
    os.makedirs(work, exist_ok=True)
    results = {}
    for seed in (0, 1, 2):
        for fmt in FORMATS:
            run_dir = os.path.join(work, f"{fmt}_seed{seed}")
            config = {"model": backbone, "data": {"train": os.path.join(photos, "train"), "val_fraction": 0.1},
                      "epochs": 30, "batch_size": 16, "precision": "fp32", "seed": seed, "gradient_checkpointing": False,
                      "method": "lora", "optim": {"lr": 3e-3}, "lora": {"rank": 8, "alpha": 16, "dropout": 0.1},
                      "frozen_dtype": fmt, "output_dir": run_dir}
            path = run_dir + ".json"
            with open(path, "w") as f:
                json.dump(config, f)
            subprocess.run([binary, "train", "--config", path], check=True, capture_output=True)
            scores = {}
            quantised_eval = ["--frozen-dtype", fmt] if fmt != "fp32" else []
            for kind, extra in (("unmerged", quantised_eval), ("merged", [])):
                out = os.path.join(work, f"eval_{fmt}_{seed}_{kind}")
                subprocess.run([binary, "eval", "--model", backbone, "--adapter", os.path.join(run_dir, "best"),
                                "--data", os.path.join(photos, "test"), "--output", out, *extra], check=True,
                               capture_output=True)
                with open(os.path.join(out, "metrics.json")) as f:
                    scores[kind] = json.load(f)["top1"]
            results[fmt, seed] = scores
            print(f"seed {seed} {fmt}: unmerged {100 * scores['unmerged']:.2f}%, merged {100 * scores['merged']:.2f}%",
                  flush=True)
    print("\n| frozen weights | held-out top-1, unmerged (mean, min-max of 3 seeds) | merged into the fp32 base |")
    print("|---|---|---|")
    for fmt in FORMATS:
        row = []
        for kind in ("unmerged", "merged"):
            accs = [100 * results[fmt, s][kind] for s in (0, 1, 2)]
            row.append(f"{statistics.mean(accs):.2f}% ({min(accs):.2f}-{max(accs):.2f})")
        print(f"| {fmt} | {row[0]} | {row[1]} |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--models", default="b,l")
    p.add_argument("--quality", action="store_true")
    p.add_argument("--work", default=os.path.join(ROOT, "build", "bench_quantized"))
    a = p.parse_args()
    os.makedirs(a.work, exist_ok=True)
    if a.quality:
        quality(a)
    else:
        speed_and_memory(a)


if __name__ == "__main__":
    main()
