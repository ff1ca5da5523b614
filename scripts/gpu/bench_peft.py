#!/usr/bin/env python3
"""Side-by-side on one GPU, interleaved: loratune vs PEFT + PyTorch eager (the user's alternative).

 1. ViT-B/16 (224, transformers layout, random init) LoRA r8 alpha16 on query/value, batch 32, fp16 autocast with
    loss scaling, AdamW: images/s (median over >= 20 steps after warm-up) and peak allocated memory, with and
    without gradient checkpointing; the same weights on both sides (loratune gets the model exported as a bundle).
 2. Interop: an adapter saved by PEFT loads in loratune with the same logits; an adapter saved by loratune loads in
    PEFT with the same logits.
 3. 12 GB emulation: the largest batch that trains (fp16, checkpointing) for ViT-B/16, ViT-L/16 and ViT-H/14 with the
    process capped at 12 GiB of CUDA memory.

usage: bench_peft.py --bench build-gpu/bin/loratune_bench --work DIR --out DIR
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [os.path.join(ROOT, "scripts", "export"), os.path.join(ROOT, "tests", "python")]

import torch  # noqa: E402

SIZES = {"vit_b16": (768, 12, 12, 3072, 16, 224), "vit_l16": (1024, 24, 16, 4096, 16, 224),
         "vit_h14": (1280, 32, 16, 5120, 14, 224)}


def hf_model(name, classifier=True):
    from transformers import ViTConfig, ViTForImageClassification, ViTModel

    hidden, layers, heads, mlp, patch, size = SIZES[name]
    cfg = ViTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=mlp,
                    patch_size=patch, image_size=size, num_labels=10, attn_implementation="sdpa")
    torch.manual_seed(0)
    return ViTForImageClassification(cfg) if classifier else ViTModel(cfg, add_pooling_layer=False)


def export_bundle(model, path):
    """The ViTModel part of `model` as a loratune bundle (same weights)."""
    import hf_vit

    if not os.path.exists(path):
        vit = model.vit if hasattr(model, "vit") else model
        processor = {"size": {"height": 224, "width": 224}, "resample": 2, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
        hf_vit.export(vit.float().cpu().eval(), processor, "random ViT", path)
    return path


def peft_step_benchmark(name, batch, checkpoint, steps=30):
    from peft import LoraConfig, get_peft_model

    model = hf_model(name).cuda()
    if checkpoint:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                             modules_to_save=["classifier"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    scaler = torch.amp.GradScaler("cuda")
    x = torch.randn(batch, 3, 224, 224, device="cuda")
    y = torch.arange(batch, device="cuda") % 10
    times = []
    torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.float16):
            loss = torch.nn.functional.cross_entropy(model(pixel_values=x).logits.float(), y)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    median = statistics.median(times[steps // 3:])
    result = {"images_per_s": batch / median, "device_peak_allocated": torch.cuda.max_memory_allocated()}
    del model, opt
    torch.cuda.empty_cache()
    return result


def loratune_step(bench, bundle, batch, checkpoint, steps=30, env=None, extra=()):
    cmd = [bench, "step", f"model={bundle}", f"batch={batch}", "precision=fp16", f"checkpoint={int(checkpoint)}",
           f"steps={steps}", "device=cuda", "threads=8", *extra]
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if p.returncode != 0:
        return None
    return json.loads(p.stdout.strip().splitlines()[-1])


def interop(bench, work, lines):
    import safetensors_lite
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(1)
    base = hf_model("vit_b16")
    bundle = export_bundle(base, os.path.join(work, "vit_b16.pt"))
    x = torch.randn(2, 3, 224, 224)
    safetensors_lite.save({"input": x}, os.path.join(work, "probe.safetensors"))

    # PEFT -> loratune: non-zero B so that the adapter matters.
    peft_model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                                 modules_to_save=["classifier"]))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    peft_dir = os.path.join(work, "peft_adapter")
    peft_model.save_pretrained(peft_dir)
    with torch.no_grad():
        expected = peft_model.eval()(pixel_values=x).logits
    out = os.path.join(work, "peft_in_loratune.safetensors")
    subprocess.run([bench, "logits", f"model={bundle}", f"adapter={peft_dir}", f"input={work}/probe.safetensors",
                    f"out={out}"], check=True, capture_output=True)
    got = safetensors_lite.load(out)[0]["logits"]
    lines.append(f"PEFT adapter in loratune: max |logits difference| = {(got - expected).abs().max():.2e}")

    # loratune -> PEFT: a few training steps in loratune, saved, loaded by PEFT on the same base weights.
    lt_dir = os.path.join(work, "loratune_adapter")
    loratune_step(bench, bundle, 4, False, steps=3, extra=(f"save={lt_dir}", f"probe={work}/probe.safetensors"))
    expected = safetensors_lite.load(f"{work}/probe.safetensors.logits.safetensors")[0]["logits"]
    fresh = hf_model("vit_b16")
    peft_loaded = PeftModel.from_pretrained(fresh, lt_dir).eval()
    with torch.no_grad():
        got = peft_loaded(pixel_values=x.cuda() if next(peft_loaded.parameters()).is_cuda else x).logits.cpu()
    lines.append(f"loratune adapter in PEFT: max |logits difference| = {(got - expected).abs().max():.2e}")


def largest_batch(bench, bundle, limit_gb=12):
    lo, hi, best = 1, 512, 0
    while lo <= hi:
        mid = (lo + hi) // 2
        r = loratune_step(bench, bundle, mid, True, steps=3, env={"LORATUNE_CUDA_MEMORY_GB": str(limit_gb)})
        if r:
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return best


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    os.makedirs(a.work, exist_ok=True)
    lines = []
    if not torch.cuda.is_available():
        print("no CUDA device: the GPU benchmark needs one (dry run ends here)")
        return
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        print(f"missing {e.name}: carry it as a wheel (see the device tool's README)")
        return
    bundle = export_bundle(hf_model("vit_b16"), os.path.join(a.work, "vit_b16.pt"))
    lines += ["## ViT-B/16, LoRA r8 q/v, batch 32, fp16 + loss scaling, AdamW (median of 20 steps after 10)",
              "| checkpointing | PEFT images/s | loratune images/s | ratio | PEFT peak | loratune peak | ratio |",
              "|---|---|---|---|---|---|---|"]
    for ckpt in (False, True):
        peft_runs, lt_runs = [], []
        for r in range(2):  # interleaved
            order = [("peft", lambda: peft_step_benchmark("vit_b16", 32, ckpt)),
                     ("lt", lambda: loratune_step(a.bench, bundle, 32, ckpt))]
            for who, fn in (order if r == 0 else order[::-1]):
                (peft_runs if who == "peft" else lt_runs).append(fn())
        pi = statistics.median(x["images_per_s"] for x in peft_runs)
        li = statistics.median(x["images_per_s"] for x in lt_runs)
        pm = max(x["device_peak_allocated"] for x in peft_runs)
        lm = max(x["device_peak_allocated"] for x in lt_runs)
        lines.append(f"| {'on' if ckpt else 'off'} | {pi:.1f} | {li:.1f} | {li / pi:.2f} | {pm / 2**30:.2f} GiB | "
                     f"{lm / 2**30:.2f} GiB | {lm / pm:.2f} |")
    lines.append("")
    interop(a.bench, a.work, lines)
    lines += ["", "## Largest batch that trains in 12 GiB (loratune, LoRA r8 q/v, fp16, checkpointing)",
              "| model | batch |", "|---|---|"]
    for name in ("vit_b16", "vit_l16", "vit_h14"):
        b = export_bundle(hf_model(name, classifier=False), os.path.join(a.work, f"{name}.pt"))
        lines.append(f"| {name} | {largest_batch(a.bench, b)} |")
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(a.out, "gpu_benchmark.md"), "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
