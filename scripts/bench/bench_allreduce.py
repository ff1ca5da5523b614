#!/usr/bin/env python3
"""Data-parallel cost on this machine: the gradient all-reduce of one optimiser step (ViT-B/16, LoRA r8 on
query/value + a 10-class head, two Gloo workers on the loopback interface) against the step itself.

usage: /usr/bin/python3 scripts/bench/bench_allreduce.py [--build build] [--model BUNDLE]
Without --model, exports a random-weight timm ViT-B/16 (../shared/upstream/timm) as bench_memory_plan.py does.
"""
import argparse
import json
import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "scripts", "bench"))
import bench_memory_plan  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--build", default=os.path.join(ROOT, "build"))
    p.add_argument("--model")
    a = p.parse_args()
    bench = os.path.join(a.build, "bin", "loratune_bench")
    work = os.path.join(a.build, "bench_memory_plan")
    os.makedirs(work, exist_ok=True)
    model = a.model or bench_memory_plan.export("vit_base_patch16_224", os.path.join(work, "vit_base_patch16_224.pt"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workers = [subprocess.Popen([bench, "allreduce", f"model={model}", "iterations=50", "threads=1"],
                                stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                     "MASTER_PORT": str(port)}) for r in range(2)]
    outs = [w.communicate(timeout=600)[0] for w in workers]
    reduce = json.loads(outs[0].strip().splitlines()[-1])
    print(f"all-reduce of {reduce['floats']:,} fp32 gradients ({reduce['floats'] * 4 / 2**20:.2f} MiB), 2 Gloo workers: "
          f"median {reduce['median_s'] * 1e3:.2f} ms, p90 {reduce['p90_s'] * 1e3:.2f} ms")
    for precision, batch in (("bf16", 8), ("fp32", 8)):
        out = subprocess.run([bench, "step", f"model={model}", f"batch={batch}", "checkpoint=0", f"precision={precision}",
                              "steps=6", "threads=1"], check=True, capture_output=True, text=True).stdout
        step = json.loads(out.strip().splitlines()[-1])["median_step_s"]
        print(f"training step, micro-batch {batch}, {precision}, 1 thread (one worker's share of 2 cores): "
              f"{step:.2f} s; the all-reduce is {reduce['median_s'] / step:.2%} of it")


if __name__ == "__main__":
    main()
