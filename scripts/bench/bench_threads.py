#!/usr/bin/env python3
"""Fast on a busy PC: LoRA training steps with `threads: auto` against pinned thread counts, on this machine quiet
and under a competing load this script starts itself (one busy process per core, each ending after a bounded
time), interleaved in one run; the eager Python peer (scripts/bench/python_step.py, all cores as PyTorch's default)
in the same conditions; and the demo's pretraining phase (`loratune train`, method full on the Fashion-MNIST ViT).

Each line is the mean step time over the timed steps (the probes of `auto` included), and its ratio to the best
pinned loratune count measured in the same conditions. Goals: loaded, auto within 1.2x of that best; quiet, auto
within noise of all cores.

usage: /usr/bin/python3 scripts/bench/bench_threads.py [--models vit_s16,vit_b16] [--batch 8] [--steps 24]
                                                        [--slow-steps 4] [--demo-steps 60] [--no-demo]
"""
import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
import bench_models  # noqa: E402

CORES = os.cpu_count()


class Load:
    """One busy process per core while inside `with`; each exits by itself after `limit` seconds at the latest."""

    def __init__(self, limit=1800):
        self.limit = limit
        self.procs = []

    def __enter__(self):
        code = f"import time\nend = time.time() + {self.limit}\nwhile time.time() < end: pass\n"
        self.procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(CORES)]
        time.sleep(3)
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
            p.wait()
        time.sleep(3)


def loratune_step(bench, bundle, batch, steps, threads):
    out = subprocess.run([bench, "step", f"model={bundle}", f"batch={batch}", f"steps={steps}", f"threads={threads}"],
                         check=True, capture_output=True, text=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    return r["mean_step_s"], r["threads"]


def python_step(name, bundle, batch, steps):
    out = subprocess.run([sys.executable, os.path.join(HERE, "python_step.py"), name, bundle, str(batch), "fp32",
                          str(steps), str(CORES)], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["mean_step_s"], [CORES]


def demo_pretraining(binary, work, threads, steps):
    """Seconds per optimiser step of the demo's pretraining (method full, batch 64) over `steps` steps, from the run's
    own training time (summary.json: steps only, not the start-up)."""
    data = os.path.join(ROOT, "build", "demo_ci", "data", "pretrain")
    model = os.path.join(ROOT, "build", "demo_ci", "models", "fmnist_vit_random.pt")
    out = tempfile.mkdtemp(dir=work)
    config = os.path.join(out, "config.json")
    with open(config, "w") as f:
        json.dump({"model": model, "data": {"train": data, "val_fraction": 0.05, "workers": 1}, "method": "full",
                   "batch_size": 64, "precision": "fp32", "gradient_checkpointing": False, "max_steps": steps,
                   "eval_every_epochs": 1000, "threads": threads, "output_dir": os.path.join(out, "run")}, f)
    subprocess.run([binary, "train", "--config", config], check=True, capture_output=True)
    with open(os.path.join(out, "run", "summary.json")) as f:
        s = json.load(f)
    return 64 / s["train_images_per_second"], s.get("threads", [])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--build", default=os.path.join(ROOT, "build"))
    p.add_argument("--models", default="vit_s16,vit_b16")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=24, help="steps of the runs that are not pathologically slow")
    p.add_argument("--slow-steps", type=int, default=4,
                   help="steps of the runs on all cores under load (10-50x slower): loratune pinned, Python")
    p.add_argument("--demo-steps", type=int, default=60)
    p.add_argument("--no-demo", action="store_true")
    a = p.parse_args()
    bench = os.path.join(a.build, "bin", "loratune_bench")
    binary = os.path.join(a.build, "bin", "loratune")
    work = os.path.join(a.build, "bench_threads")
    os.makedirs(work, exist_ok=True)
    print(f"{CORES} cores; batch {a.batch}; mean step time over the timed steps (auto's probes included)")

    cases = []  # (workload, runner(threads) -> (seconds, thread counts), python runner or None)
    for name in filter(None, a.models.split(",")):
        bundle = bench_models.make_bundle(name, os.path.join(work, name + ".pt"))
        cases.append((f"{name} LoRA step", lambda t, loaded, b=bundle: loratune_step(
            bench, b, a.batch, a.slow_steps if loaded and t == str(CORES) else a.steps, t),
            lambda loaded, b=bundle, n=name: python_step(n, b, a.batch, a.slow_steps + 2 if loaded else a.steps)))
    if not a.no_demo and os.path.isdir(os.path.join(ROOT, "build", "demo_ci", "data", "pretrain")):
        cases.append(("demo pretraining step", lambda t, loaded: demo_pretraining(
            binary, work, t if t == "auto" else int(t), 6 if loaded and t == str(CORES) else a.demo_steps), None))

    for workload, run, peer in cases:
        for loaded in (False, True):
            results = {}
            with Load() if loaded else contextlib.nullcontext():
                for threads in ["auto", str(CORES), "1"] if loaded else ["auto", str(CORES)]:
                    results["loratune threads=" + threads] = run(threads, loaded)
                if peer:
                    results["Python eager (PyTorch's default threads)"] = peer(loaded)
            best = min(v[0] for k, v in results.items() if k.startswith("loratune threads=") and k != "loratune threads=auto")
            print(f"\n{workload}, {'one busy process per core' if loaded else 'quiet'}:")
            for label, (seconds, counts) in results.items():
                print(f"  {label:42s} {seconds:8.3f} s  {seconds / best:6.2f}x best pinned   threads {counts}")


if __name__ == "__main__":
    main()
