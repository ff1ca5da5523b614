#!/usr/bin/env python3
"""How well `loratune plan` predicts peak memory: predicted vs measured peak tensor bytes.

1. ViT-Ti/S/B (timm, random weights, exported with scripts/export/timm_vit.py from ../shared/upstream/timm) x
   micro-batch {1, 8, 32} x checkpointing {off, on} x precision {fp32, bf16}, LoRA r8 q/v without dropout: the
   prediction (`loratune plan --json`: two probe steps of 2 and 4 images, extended linearly) against two training
   steps of `loratune_bench step` (the caching CPU allocator's high-water mark of tensor bytes; on a GPU machine with
   --device cuda, the CUDA allocator's peak). Prints each case, then the median and worst relative error.
2. The formula of `plan --table` against the CUDA peaks measured on an H200 (docs/measurements/*.json).
3. --resident: on the CPU, plan's resident total (tensors, data pipeline, decoded-photo cache, process baseline)
   against the peak RSS of real `loratune train` runs (one epoch on 100 of the demo's photos, validation included),
   ViT-Ti/S, micro-batch 8 and 16, checkpointing off and on; --frozen int8,nf4 adds quantised frozen weights.
   Needs the demo's photos (`bash scripts/demo.sh`).

usage: /usr/bin/python3 scripts/bench/bench_memory_plan.py [--build build] [--device cpu] [--models ti,s,b]
       /usr/bin/python3 scripts/bench/bench_memory_plan.py --resident [--models ti,s] [--batches 8,16]
                                                           [--frozen fp32,int8,nf4]
"""
import argparse
import glob
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
UPSTREAM = os.path.join(os.path.dirname(ROOT), "shared", "upstream")
MODELS = {"ti": ("ViT-Ti/16", "vit_tiny_patch16_224"), "s": ("ViT-S/16", "vit_small_patch16_224"),
          "b": ("ViT-B/16", "vit_base_patch16_224")}


def export(timm_name, path):
    if not os.path.exists(path):
        env = {**os.environ, "PYTHONPATH": os.path.join(UPSTREAM, "timm")}
        subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "export", "timm_vit.py"), "--model", timm_name,
                        "--random-init", "--output", path], check=True, env=env, capture_output=True)
    return path


def predicted(binary, model, batch, checkpoint, precision, device):
    out = subprocess.run([binary, "plan", "--json", "--classes", "10", "--set", f"model={model}", "--set", "data.train=-",
                          "--set", "lora.dropout=0", "--set", f"batch_size={batch}", "--set",
                          f"gradient_checkpointing={'true' if checkpoint else 'false'}", "--set", f"precision={precision}",
                          "--set", f"device={device}", "--set", "threads=2"],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)["total"]


def measured(bench, model, batch, checkpoint, precision, device):
    out = subprocess.run([bench, "step", f"model={model}", f"batch={batch}", f"checkpoint={int(checkpoint)}",
                          f"precision={precision}", "steps=2", f"device={device}", "threads=2"],
                         check=True, capture_output=True, text=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    return r["device_peak_allocated"] if device.startswith("cuda") else r["peak_tensor_bytes"]


def formula_vs_gpu(binary):
    files = sorted(glob.glob(os.path.join(ROOT, "docs", "measurements", "*.json")))
    if not files:
        return
    table = json.loads(subprocess.run([binary, "plan", "--table", "--json"], check=True, capture_output=True,
                                      text=True).stdout)
    rows = {r["name"]: r["settings"] for r in table}
    names = {"vit_b16": "ViT-B/16", "vit_l16": "ViT-L/16", "vit_h14": "ViT-H/14"}
    print(f"\nFormula (plan --table) vs CUDA peaks in {os.path.relpath(files[-1], ROOT)}:\n")
    print("| model | setting | batch | predicted | measured | error |\n|---|---|---|---|---|---|")
    data = json.load(open(files[-1]))
    cases = []
    for key, name in names.items():
        r = data.get(f"largest_batch_{key}")
        if r and isinstance(r.get("largest_batch"), int):
            cases.append((name, "lora_checkpoint", r["largest_batch"], r["peak_allocated"]))
            for b, peak in r["tried"].items():
                if int(b) == 8 and peak > 0:
                    cases.append((name, "lora_checkpoint", 8, peak))
    for ckpt in (False, True):
        runs = data.get(f"speed_checkpoint_{ckpt}", {}).get("loratune", [])
        if runs:
            cases.append(("ViT-B/16", "lora_checkpoint" if ckpt else "lora", 32, runs[0]["device_peak_allocated"]))
    for name, setting, batch, peak in cases:
        s = rows[name][setting]
        pred = s["fixed"] + s["per_image"] * batch
        print(f"| {name} | {setting} | {batch} | {pred / 2**30:.3f} GiB | {peak / 2**30:.3f} GiB | {pred / peak - 1:+.1%} |")


def resident_vs_rss(binary, work, models, batches, frozen):
    photos = os.path.join(ROOT, "demo", "data", "photos", "train")
    if not os.path.isdir(photos):
        sys.exit(f"{photos} is missing: run `bash scripts/demo.sh` first")
    subset = os.path.join(work, "photos_100")
    if not os.path.isdir(subset):
        for c in sorted(os.listdir(photos)):
            os.makedirs(os.path.join(subset, c))
            for f in sorted(os.listdir(os.path.join(photos, c)))[:20]:
                os.symlink(os.path.join(photos, c, f), os.path.join(subset, c, f))
    print("plan's resident total vs the peak RSS of `loratune train` (1 epoch, 100 photos, fp32, LoRA r8 q/v):\n")
    print("| model | frozen weights | batch | checkpointing | tensors | photo cache | baseline | planned resident | "
          "measured peak RSS | error |\n|---|---|---|---|---|---|---|---|---|---|")
    errors = []
    for key in models.split(","):
        name, timm_name = MODELS[key]
        model = export(timm_name, os.path.join(work, timm_name + ".pt"))
        for fmt, batch, ckpt in itertools.product(frozen.split(","), batches, ("false", "true")):
            config = os.path.join(work, "resident.json")
            with open(config, "w") as f:
                json.dump({"model": model, "data": {"train": subset, "val_fraction": 0.1, "workers": 2},
                           "epochs": 1, "batch_size": batch, "precision": "fp32", "threads": 2,
                           "gradient_checkpointing": ckpt == "true", "lora": {"dropout": 0.0},
                           "frozen_dtype": fmt,
                           "output_dir": os.path.join(work, "resident_run")}, f)
            plan = json.loads(subprocess.run([binary, "plan", "--config", config, "--json"], check=True,
                                             capture_output=True, text=True).stdout)
            shutil.rmtree(os.path.join(work, "resident_run"), ignore_errors=True)  # a fresh run each time
            subprocess.run([binary, "train", "--config", config], check=True, capture_output=True)
            with open(os.path.join(work, "resident_run", "summary.json")) as f:
                rss = json.load(f)["peak_memory_bytes"]
            r = plan["resident"]
            errors.append(abs(r["total"] / rss - 1))
            print(f"| {name} | {fmt} | {batch} | {'on' if ckpt == 'true' else 'off'} | "
                  f"{plan['total'] / 2**20:.0f} MiB | {r['image_cache'] / 2**20:.0f} MiB | {r['process_baseline'] / 2**20:.0f} MiB | "
                  f"{r['total'] / 2**20:.0f} MiB | {rss / 2**20:.0f} MiB | {r['total'] / rss - 1:+.1%} |", flush=True)
    print(f"\n{len(errors)} runs: median error {statistics.median(errors):.1%}, worst {max(errors):.1%}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--build", default=os.path.join(ROOT, "build"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--models", default="ti,s,b")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--resident", action="store_true", help="plan's resident total against train's peak RSS (CPU)")
    p.add_argument("--frozen", default="fp32", help="with --resident: frozen weight formats, e.g. fp32,int8,nf4")
    a = p.parse_args()
    binary, bench = os.path.join(a.build, "bin", "loratune"), os.path.join(a.build, "bin", "loratune_bench")
    work = os.path.join(a.build, "bench_memory_plan")
    os.makedirs(work, exist_ok=True)
    if a.resident:
        batches = [8, 16] if a.batches == "1,8,32" else [int(b) for b in a.batches.split(",")]
        return resident_vs_rss(binary, work, "ti,s" if a.models == "ti,s,b" else a.models, batches, a.frozen)
    precisions = ["fp32", "bf16"] if a.device == "cpu" else ["fp32", "fp16"]
    print(f"Predicted vs measured peak tensor bytes on {a.device}, LoRA r8 q/v (no dropout), AdamW, 2 steps:\n")
    print("| model | batch | checkpointing | precision | predicted | measured | error |\n|---|---|---|---|---|---|---|")
    errors = []
    start = time.time()
    for key in a.models.split(","):
        name, timm_name = MODELS[key]
        model = export(timm_name, os.path.join(work, timm_name + ".pt"))
        for batch in (int(b) for b in a.batches.split(",")):
            for ckpt in (False, True):
                for precision in precisions:
                    pred = predicted(binary, model, batch, ckpt, precision, a.device)
                    meas = measured(bench, model, batch, ckpt, precision, a.device)
                    errors.append(abs(pred / meas - 1))
                    print(f"| {name} | {fmt} | {batch} | {'on' if ckpt else 'off'} | {precision} | {pred / 2**20:.1f} MiB | "
                          f"{meas / 2**20:.1f} MiB | {pred / meas - 1:+.1%} |", flush=True)
    print(f"\n{len(errors)} cases: median error {statistics.median(errors):.1%}, worst {max(errors):.1%} "
          f"({time.time() - start:.0f} s)")
    formula_vs_gpu(binary)


if __name__ == "__main__":
    main()
