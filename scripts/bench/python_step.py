"""Python eager training step (the user's alternative): same weights, same LoRA, same batch, 2 threads (or THREADS).
usage: python_step.py MODEL_NAME BUNDLE BATCH fp32|bf16 STEPS [THREADS]  -> one JSON line"""
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_models  # noqa: E402


def peak_rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def main():
    name, bundle, batch, precision, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
    torch.set_num_threads(int(sys.argv[6]) if len(sys.argv) > 6 else 2)
    torch.manual_seed(0)
    model = bench_models.eager_with_lora(name, bundle)
    head = torch.nn.Linear(bench_models.config(name).hidden, 10)
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4)
    x = torch.randn(batch, 3, 224, 224)
    y = torch.arange(batch) % 10
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = head(model(x))
        torch.nn.functional.cross_entropy(logits.float(), y).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    timed = sorted(times[2:])
    print(json.dumps({"median_step_s": timed[len(timed) // 2], "mean_step_s": sum(times[2:]) / len(timed),
                      "steps": len(timed), "peak_rss": peak_rss()}))


if __name__ == "__main__":
    main()
