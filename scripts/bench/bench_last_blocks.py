#!/usr/bin/env python3
"""lora.last_blocks on ViT-B/16 (torchvision architecture, random weights, 224 px): step time and peak memory of
LoRA r8 q/v training with adapters in the last N = 12, 6, 4, 2 blocks, measured in one run on this machine (no
backward runs through the blocks in front of the first adapted one). Run after `bash scripts/test.sh` built build/.

  /usr/bin/python3 scripts/bench/bench_last_blocks.py [--batch 4] [--steps 6] [--checkpoint 0]
"""
import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--checkpoint", choices=["0", "1"], default="0")
    p.add_argument("--out", default=os.path.join(ROOT, "build", "bench_last_blocks"))
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    model = os.path.join(a.out, "vit_b_16_random.pt")
    if not os.path.exists(model):
        subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "export", "torchvision_vit.py"), "--arch", "vit_b_16",
                        "--random-init", "--output", model], check=True)
    rows = []
    for n in (12, 6, 4, 2):
        out = subprocess.run([os.path.join(ROOT, "build", "bin", "loratune_bench"), "step", f"model={model}",
                              f"batch={a.batch}", "precision=fp32", f"checkpoint={a.checkpoint}", f"steps={a.steps}",
                              f"last_blocks={n}"], check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        rows.append((n, r["median_step_s"], r["images_per_s"], r["peak_rss"]))
    print(f"ViT-B/16, batch {a.batch}, fp32, gradient checkpointing {'on' if a.checkpoint == '1' else 'off'}, "
          f"median of the last steps of {a.steps}")
    print("| last blocks | step (s) | images/s | peak RSS | time vs 12 | memory vs 12 |")
    print("|---|---|---|---|---|---|")
    for n, step, ips, rss in rows:
        print(f"| {n} | {step:.2f} | {ips:.2f} | {rss / 2**30:.2f} GB | {step / rows[0][1]:.2f} | {rss / rows[0][3]:.2f} |")


if __name__ == "__main__":
    main()
