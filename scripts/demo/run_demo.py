#!/usr/bin/env python3
"""The loratune demo on real images (Fashion-MNIST), doing what a user does, with the `loratune` binary:

 1. photo folders: "pretraining" classes 0-4, and "your photos" = classes 5-9 (100 per class) + a held-out folder;
 2. a small ViT (random init, scripts/export/torchvision_vit.py) pretrained with `loratune train` (method full) on
    classes 0-4, merged into a backbone bundle: the "pretrained model" no hub can give us here;
 3. adapted to the new classes three ways: lora (q/v), full, linear_probe;
 4. each evaluated on the held-out folder; the LoRA adapter merged and the merged file evaluated again; a few
    predictions;
 5. one table: method, trainable parameters, held-out top-1, peak memory, wall time; and report.html, the page to
    look at: the first two methods' runs and held-out evaluations side by side.

Re-running reuses the folders and the pretrained backbone. Profiles: demo (README command 1, < 10 min on 2 cores),
ci (a reduced run for the test suite, with assertions), bench (larger, several seeds, report to a file).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
PYTHON = "/usr/bin/python3"

PROFILES = {
    # pretraining images per class, pretraining epochs, your photos per class, held-out per class (0 = all 1000),
    # adaptation epochs, seeds
    "ci": dict(pretrain_per_class=300, pretrain_epochs=4, train_per_class=40, test_per_class=100, epochs=12, seeds=[0]),
    "demo": dict(pretrain_per_class=2000, pretrain_epochs=8, train_per_class=100, test_per_class=0, epochs=30, seeds=[0]),
    "bench": dict(pretrain_per_class=6000, pretrain_epochs=15, train_per_class=100, test_per_class=0, epochs=40,
                  seeds=[0, 1, 2]),
}

BATCH_SIZE = 16  # adaptation runs
BACKBONE = ["--image-size", "28", "--patch-size", "7", "--layers", "4", "--heads", "4", "--hidden", "128", "--mlp", "256"]

# Settings per method, chosen on the validation split of the training photos (never on the held-out folder).
METHODS = {
    "lora": {"method": "lora", "optim": {"lr": 3e-3}, "lora": {"rank": 8, "alpha": 16, "dropout": 0.1}},
    "full": {"method": "full", "optim": {"lr": 5e-4}},
    "linear_probe": {"method": "linear_probe", "optim": {"lr": 1e-2}},
}

# Adapter variants and recipes beside plain LoRA (`--methods variants`), with plain LoRA's settings except where
# noted. The backbone has 4 blocks, so "last 2 blocks" is the recipe's meaningful setting here.
_LORA = {"rank": 8, "alpha": 16, "dropout": 0.1}
VARIANTS = {
    "lora": METHODS["lora"],
    "dora": {"method": "lora", "optim": {"lr": 3e-3}, "lora": {**_LORA, "dropout": 0.0, "variant": "dora"}},
    # lr chosen on the validation split (seed 0): 3e-4, 1e-3, 3e-3 gave 92%, 92%, 78% top-1; the tie went to the lower
    # validation loss.
    "lora_plus": {"method": "lora", "optim": {"lr": 3e-4, "lora_plus_ratio": 16}, "lora": _LORA},
    "all_linear": {"method": "lora", "optim": {"lr": 3e-3}, "lora": {**_LORA, "targets": ["all-linear"]}},
    "last_2_blocks": {"method": "lora", "optim": {"lr": 3e-3}, "lora": {**_LORA, "last_blocks": 2}},
    # SSF and VPT: lr chosen on the validation split (seed 0) from 3e-3, 1e-2, 3e-2: SSF 84 / 90 / 90%, VPT-shallow
    # 78 / 90 / 90% (ties to the lower validation loss), VPT-deep 86 / 92 / 88%; SSF all-linear takes SSF's.
    "ssf": {"method": "lora", "optim": {"lr": 3e-2}, "lora": {"variant": "ssf"}},
    "ssf_all_linear": {"method": "lora", "optim": {"lr": 3e-2}, "lora": {"variant": "ssf", "targets": ["all-linear"]}},
    "vpt_shallow": {"method": "vpt", "optim": {"lr": 3e-2}, "vpt": {"tokens": 10, "deep": False}},
    "vpt_deep": {"method": "vpt", "optim": {"lr": 1e-2}, "vpt": {"tokens": 10, "deep": True}},
    # AdaptFormer, bottleneck 16 (an eighth of the width, as 64 of ViT-B's 768 is about a twelfth): lr from 3e-3, 1e-2,
    # 3e-2 on the validation split (seed 0): 90 / 92 / 92%, the tie to the lower validation loss.
    "adaptformer": {"method": "adaptformer", "optim": {"lr": 1e-2}, "adaptformer": {"bottleneck": 16}},
    "full": METHODS["full"],
}


def stage(title):
    print(f"\n=== {title}", flush=True)


def run(cmd, **kw):
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kw)


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)


def train(binary, out, name, config):
    run_dir = os.path.join(out, "runs", name)
    shutil.rmtree(run_dir, ignore_errors=True)
    path = os.path.join(out, "configs", name + ".json")
    write_json(path, dict(config, output_dir=run_dir))
    run([binary, "train", "--config", path])
    with open(os.path.join(run_dir, "summary.json")) as f:
        return run_dir, json.load(f)


def evaluate(binary, out, name, args, data):
    eval_dir = os.path.join(out, "eval", name)
    run([binary, "eval", *args, "--data", data, "--output", eval_dir])
    with open(os.path.join(eval_dir, "metrics.json")) as f:
        return json.load(f)


def human(n):
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K" if n >= 1e4 else str(n)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "demo"), help="working folder (reused between runs)")
    p.add_argument("--profile", choices=PROFILES, default="demo")
    p.add_argument("--binary", default=os.path.join(ROOT, "build", "bin", "loratune"))
    p.add_argument("--report", help="also write the results table (markdown) to this file")
    p.add_argument("--methods", choices=["methods", "variants"], default="methods",
                   help="methods: LoRA, full fine-tuning, linear probe; variants: LoRA, DoRA, LoRA+, all-linear, last blocks, "
                   "SSF, VPT, full")
    p.add_argument("--check", action="store_true", help="assert the outcome (CI): LoRA far above chance, merge exact")
    a = p.parse_args()
    prof = PROFILES[a.profile]
    out = os.path.abspath(a.out)
    os.makedirs(os.path.join(out, "configs"), exist_ok=True)
    start = time.time()

    data = os.path.join(out, "data")
    marker = os.path.join(data, f".done-{a.profile}")
    stage("1/5 photo folders from Fashion-MNIST")
    if os.path.exists(marker):
        print(f"reusing {data}")
    else:
        shutil.rmtree(data, ignore_errors=True)
        run([PYTHON, os.path.join(HERE, "fashion_mnist_folders.py"), "--out", data,
             "--pretrain-per-class", str(prof["pretrain_per_class"]), "--train-per-class", str(prof["train_per_class"]),
             "--test-per-class", str(prof["test_per_class"])])
        open(marker, "w").close()
    photos_train, photos_test = os.path.join(data, "photos", "train"), os.path.join(data, "photos", "test")

    stage("2/5 pretrained backbone: a ViT trained on classes 0-4")
    models = os.path.join(out, "models")
    backbone = os.path.join(models, f"fmnist_vit_pretrained_{a.profile}.pt")
    if os.path.exists(backbone):
        print(f"reusing {backbone}")
    else:
        random_init = os.path.join(models, "fmnist_vit_random.pt")
        run([PYTHON, os.path.join(ROOT, "scripts", "export", "torchvision_vit.py"), "--arch", "custom", "--random-init", *BACKBONE,
             "--output", random_init])
        pre_dir, pre = train(a.binary, out, "pretrain", {
            "model": random_init, "data": {"train": os.path.join(data, "pretrain"), "val_fraction": 0.05},
            "method": "full", "epochs": prof["pretrain_epochs"], "batch_size": 64, "precision": "fp32",
            "gradient_checkpointing": False, "optim": {"lr": 1e-3, "weight_decay": 0.05}})
        print(f"pretraining: validation top-1 {100 * pre['best_val_top1']:.2f}% on classes 0-4")
        run([a.binary, "merge", "--base", random_init, "--adapter", os.path.join(pre_dir, "best"), "--output", backbone,
             "--features-only"])

    methods = METHODS if a.methods == "methods" else VARIANTS
    stage(f"3/5 adapting to your photos (classes 5-9) {len(methods)} ways")
    results = []
    for seed in prof["seeds"]:
        for name, settings in methods.items():
            config = {"model": backbone, "data": {"train": photos_train, "val_fraction": 0.1},
                      "epochs": prof["epochs"], "batch_size": BATCH_SIZE, "precision": "fp32", "seed": seed,
                      "gradient_checkpointing": False, **settings}
            run_name = f"{name}_seed{seed}"
            run_dir, summary = train(a.binary, out, run_name, config)
            stage(f"4/5 held-out evaluation: {run_name}")
            metrics = evaluate(a.binary, out, run_name, ["--model", backbone, "--adapter", os.path.join(run_dir, "best")],
                               photos_test)
            results.append({"method": name, "seed": seed, "run": run_dir, "summary": summary, "top1": metrics["top1"],
                            "count": metrics["count"]})

    stage("4/5 training curves, merge the LoRA adapter and check the merged file")
    lora_run = next(r for r in results if r["method"] == "lora")
    run([a.binary, "report", lora_run["run"]])
    merged = os.path.join(models, "fmnist_vit_lora_merged.pt")
    run([a.binary, "merge", "--base", backbone, "--adapter", os.path.join(lora_run["run"], "best"), "--output", merged])
    merged_metrics = evaluate(a.binary, out, "lora_merged", ["--model", merged], photos_test)
    samples = [os.path.join(photos_test, c, sorted(os.listdir(os.path.join(photos_test, c)))[0])
               for c in sorted(os.listdir(photos_test))]
    run([a.binary, "predict", "--model", merged, *samples, "--top-k", "2"])

    stage("5/5 results")
    lines = [f"Fashion-MNIST, {prof['train_per_class']} training photos per new class, held-out: "
             f"{results[0]['count']} test images; profile {a.profile}",
             "",
             "| method | seed | trainable params | held-out top-1 | peak memory | wall time |",
             "|---|---|---|---|---|---|"]
    for r in results:
        s = r["summary"]
        lines.append(f"| {r['method']} | {r['seed']} | {human(s['trainable_params'])} "
                     f"({100 * s['trainable_params'] / s['total_params']:.2f}%) | {100 * r['top1']:.2f}% | "
                     f"{s['peak_memory_bytes'] / 2**20:.0f} MB | {s['seconds']:.1f} s |")
    if len(prof["seeds"]) > 1:
        lines += ["", "| method | mean top-1 | min | max | trainable params | peak memory | "
                      f"s / step ({BATCH_SIZE} images) | wall time (mean) |", "|---|---|---|---|---|---|---|---|"]
        for name in methods:
            runs = [r for r in results if r["method"] == name]
            accs = [100 * r["top1"] for r in runs]
            s = runs[0]["summary"]
            lines.append(f"| {name} | {sum(accs) / len(accs):.2f}% | {min(accs):.2f}% | {max(accs):.2f}% | "
                         f"{human(s['trainable_params'])} ({100 * s['trainable_params'] / s['total_params']:.2f}%) | "
                         f"{max(r['summary']['peak_memory_bytes'] for r in runs) / 2**20:.0f} MB | "
                         f"{sum(BATCH_SIZE / r['summary']['train_images_per_second'] for r in runs) / len(runs):.4f} | "
                         f"{sum(r['summary']['seconds'] for r in runs) / len(runs):.1f} s |")
    # The page to look at: LoRA's run and evaluation beside the second method's (same held-out photos).
    page = os.path.join(out, "report.html")
    runs = [r for r in results if r["seed"] == prof["seeds"][0]][:2]
    run([a.binary, "report", *[r["run"] for r in runs],
         *[arg for r in runs for arg in ("--eval", os.path.join(out, "eval", os.path.basename(r["run"])))],
         "--output", page])
    lines += ["", f"LoRA merged into the backbone: held-out top-1 {100 * merged_metrics['top1']:.2f}% "
                  f"(unmerged {100 * lora_run['top1']:.2f}%)",
              f"plots: {lora_run['run']}/*.png (training curves), {os.path.join(out, 'eval')}/*/confusion_matrix.png",
              f"total time {time.time() - start:.0f} s",
              f"report: {page} (open it in a browser)"]
    table = "\n".join(lines)
    print(table)
    if a.report:
        with open(a.report, "w") as f:
            f.write(table + "\n")
    if a.check:
        assert lora_run["top1"] > 0.4, f"LoRA held-out top-1 {lora_run['top1']:.3f} is not far above chance (0.2)"
        assert merged_metrics["confusion_matrix"] == json.load(open(os.path.join(out, "eval", lora_run["run"].split("/")[-1],
                                                                                   "metrics.json")))["confusion_matrix"], \
            "merged and unmerged predictions differ"
        print("checks passed: LoRA beats chance by a wide margin; merged and unmerged evaluations agree")
        print("1 passed, 0 failed")


if __name__ == "__main__":
    main()
