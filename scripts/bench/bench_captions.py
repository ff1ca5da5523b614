#!/usr/bin/env python3
"""Captioned photos and contrastive negatives (issue: photos with captions), measured with the loratune CLI.

The small CLIP and the shifted Fashion-MNIST photos of bench_clip_shift.py (pretrained on the original rendering;
"your photos": 100 line drawings per class). Each photo gets two captions from its class and its look measured on
its pixels (how bold the drawing is, its box's shape, how full the box is, where its ink leans; five words each,
three for the lean, cut at the training photos' quantiles), e.g. "a bold, very wide sneaker, leaning left." and "a
line drawing of a sparse, very wide sneaker.". Retrieval is scored on 30 test photos per class (600 captions): two
photos may share a caption, so recall@1 has a ceiling below 100%, printed as "distinct captions".

Rows, each over --seeds, all at batch_size 8 x grad_accum_steps 4 (the memory of 8 photos):
- zero-shot (no training);
- cross-entropy LoRA (zero-shot head);
- contrastive LoRA on class prompts (FLYP) and on the captions, each with negatives over the whole step of 32
  (contrastive.negatives step, cached embeddings) and over each micro-batch of 8 (micro_batch).
Columns: retrieval recall@1 both ways and image->text recall@5 on the test captions; top-1 on the target rendering
and the original one (forgetting); seconds per step and peak memory from each run's summary.json.

usage: /usr/bin/python3 scripts/bench/bench_captions.py [--work build/bench_clip_shift] [--seeds 0 1 2]
"""
import argparse
import json
import os
import shutil
import sys

import numpy as np
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_clip_shift as shift  # noqa: E402

BATCH, ACCUM = 8, 4


def measures(path):
    """A line drawing's look, measured: mean ink, its box's aspect (width / height), the share of the box inked, and
    where its ink's centre lies across the box (0 left, 1 right)."""
    x = np.asarray(Image.open(path).convert("L"), dtype=np.float64) / 255.0
    ys, xs = np.nonzero(x > 0.1)
    if len(xs) == 0:
        return 0.0, 1.0, 0.0, 0.5
    box = x[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    centre = (box.sum(0) * np.arange(box.shape[1])).sum() / max(box.sum(), 1e-9) / max(box.shape[1] - 1, 1)
    return x.mean(), box.shape[1] / box.shape[0], (box > 0.1).mean(), centre


# Words for each measure, from low to high; the training photos' quintiles (terciles for the lean) choose them.
WORDS = [["very faint", "faint", "clear", "bold", "very bold"],
         ["very tall", "tall", "square", "wide", "very wide"],
         ["very sparse", "sparse", "even", "dense", "very dense"],
         ["leaning left", "centred", "leaning right"]]


def describe(values, edges):
    """Each measure's word: the bin of the training photos' quantiles it falls in."""
    return [WORDS[k][int(np.searchsorted(edges[k], v))] for k, v in enumerate(values)]


def caption_rows(folder, out, edges, per_class=None):
    rows = []
    for name in shift.CLASSES:
        for f in sorted(os.listdir(os.path.join(folder, name)))[:per_class]:
            path = os.path.join(folder, name, f)
            ink, shape, fill, lean = describe(measures(path), edges)
            rows.append({"file_name": os.path.relpath(path, os.path.dirname(out)),
                         "text": [f"a {ink}, {shape} {name}, {lean}.", f"a line drawing of a {fill}, {shape} {name}."]})
    return rows


def write_captions(train, test, work):
    """metadata.jsonl files for the training photos and 30 test photos per class (paths relative to each file), two
    captions per photo from its class and measured look (word bins from the training photos)."""
    files = [os.path.join(train, n, f) for n in shift.CLASSES for f in sorted(os.listdir(os.path.join(train, n)))]
    values = np.array([measures(f) for f in files])
    edges = [np.quantile(values[:, k], np.linspace(0, 1, len(WORDS[k]) + 1)[1:-1]) for k in range(len(WORDS))]
    out = []
    for folder, name, per_class in ((train, "target_train_captions.jsonl", None), (test, "target_test_captions.jsonl", 30)):
        path = os.path.join(work, "data", name)
        with open(path, "w") as f:
            for row in caption_rows(folder, path, edges, per_class):
                f.write(json.dumps(row) + "\n")
        out.append(path)
    return out


def evaluate(binary, work, name, model_args, data, captions):
    out = os.path.join(work, "eval_captions", name)
    shift.run(binary, "eval", *model_args, "--data", data, "--output", out, "--threads", "2",
              *(["--retrieval", captions] if captions else []))
    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f)


# (key, table label, settings over the shared ones).
METHODS = [("ce", "cross-entropy LoRA (zero-shot head)", {}),
           ("flyp_step", "contrastive, class prompts, negatives: step (32)", {"loss": "contrastive"}),
           ("flyp_micro", "contrastive, class prompts, negatives: micro-batch (8)",
            {"loss": "contrastive", "contrastive": {"negatives": "micro_batch"}}),
           ("captions_step", "contrastive, captions, negatives: step (32)", {"loss": "contrastive", "captions": True}),
           ("captions_micro", "contrastive, captions, negatives: micro-batch (8)",
            {"loss": "contrastive", "captions": True, "contrastive": {"negatives": "micro_batch"}})]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--binary", default=os.path.join(shift.ROOT, "build", "bin", "loratune"))
    p.add_argument("--upstream", default=os.path.join(shift.ROOT, "..", "shared", "upstream"))
    p.add_argument("--work", default=os.path.join(shift.ROOT, "build", "bench_clip_shift"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--report", help="also write the table (markdown) here")
    p.add_argument("--methods", nargs="+", choices=[m[0] for m in METHODS], default=[m[0] for m in METHODS])
    args = p.parse_args()
    work = os.path.abspath(args.work)
    shift.make_data(work, 300)
    clip = shift.pretrain(work, os.path.abspath(args.upstream), 3)
    model = os.path.join(work, "clip.pt")
    if not os.path.exists(model):
        shift.run(args.binary, "import", clip, "--output", model)
    data = {k: os.path.join(work, "data", k) for k in ("target_train", "target_test", "original_test")}
    train_captions, test_captions = write_captions(data["target_train"], data["target_test"], work)
    with open(test_captions) as f:
        texts = [t for line in f for t in json.loads(line)["text"]]
    ceiling = f"distinct test captions: {len(set(texts))} of {len(texts)} (text->image R@1 at most {100 * len(set(texts)) / len(texts):.1f}%)"
    print(ceiling, flush=True)
    shutil.rmtree(os.path.join(work, "eval_captions"), ignore_errors=True)

    rows, timing = {}, {}

    def record(label, model_args, tag):
        target = evaluate(args.binary, work, tag + "_target", model_args, data["target_test"], test_captions)
        original = evaluate(args.binary, work, tag + "_original", model_args, data["original_test"], None)
        r = target["retrieval"]["adapted" if "--adapter" in model_args else "base"]
        row = rows.setdefault(label, {k: [] for k in ("i2t1", "t2i1", "i2t5", "target", "original")})
        row["i2t1"].append(r["image_to_text"]["recall@1"])
        row["t2i1"].append(r["text_to_image"]["recall@1"])
        row["i2t5"].append(r["image_to_text"]["recall@5"])
        row["target"].append(target["top1"])
        row["original"].append(original["top1"])

    record("zero-shot", ["--model", model, "--zero-shot"], "zero_shot")
    methods = [m for m in METHODS if m[0] in args.methods]
    for seed in args.seeds:
        for key, label, settings in methods:
            settings = dict(settings)
            run_dir = os.path.join(work, f"captions_bench_{key}_seed{seed}")
            shutil.rmtree(run_dir, ignore_errors=True)
            config = {"model": model,
                      "data": {"train": data["target_train"], "val": None, "val_fraction": 0.1, "workers": 2},
                      "head": {"init": "zero_shot"}, "epochs": args.epochs, "batch_size": BATCH,
                      "grad_accum_steps": ACCUM, "precision": "fp32", "seed": seed, "threads": 2,
                      "optim": {"lr": 1e-3}, "lora": {"rank": 8, "alpha": 16, "dropout": 0.1}, "output_dir": run_dir}
            if settings.pop("captions", False):
                config["data"]["captions"] = train_captions
            config.update(settings)
            with open(run_dir + ".json", "w") as f:
                json.dump(config, f)
            shift.run(args.binary, "train", "--config", run_dir + ".json")
            with open(os.path.join(run_dir, "summary.json")) as f:
                summary = json.load(f)
            timing.setdefault(label, []).append((BATCH * ACCUM / summary["train_images_per_second"],
                                                 summary["peak_memory_bytes"]))
            record(label, ["--model", model, "--adapter", os.path.join(run_dir, "adapter")], f"{key}_{seed}")

    cell = shift.cell
    lines = ["| method | image->text R@1 | text->image R@1 | image->text R@5 | target top-1 | original top-1 | "
             "s / step (32 photos) | peak memory |", "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        step, rss = shift.timing_cells(timing.get(name, []))
        lines.append(f"| {name} | {cell(r['i2t1'])} | {cell(r['t2i1'])} | {cell(r['i2t5'])} | {cell(r['target'])} | "
                     f"{cell(r['original'])} | {step} | {rss} |")
    shift.publish("\n".join(lines) + "\n\n" + ceiling, args.report)

if __name__ == "__main__":
    main()
