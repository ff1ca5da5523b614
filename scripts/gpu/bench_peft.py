#!/usr/bin/env python3
"""Side-by-side on one GPU, interleaved: loratune vs PEFT + PyTorch eager (the user's alternative).

 1. ViT-B/16 (224, transformers layout, random init) LoRA r8 alpha16 on query/value, batch 32, fp16 autocast with
    loss scaling, AdamW: images/s (median over >= 20 steps after warm-up) and peak allocated memory, with and
    without gradient checkpointing; the same weights on both sides (loratune gets the model exported as a bundle).
 2. Interop: an adapter saved by PEFT loads in loratune with the same logits; an adapter saved by loratune loads in
    PEFT with the same logits.
 3. 12 GB emulation: the largest batch that trains (fp16, checkpointing) for ViT-B/16, ViT-L/16 and ViT-H/14 with the
    process capped at 12 GiB of CUDA memory.
 4. MobileCLIP2-S2's image tower (open_clip + timm, random init, exported by scripts/export/open_clip_mobileclip.py):
    loratune against the same tower in PyTorch eager with LoRA r8 alpha 16 on the q and v rows of each fused qkv
    (what PEFT cannot target), batch 32 at 256 px, fp16 autocast with loss scaling, AdamW.

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


def hf_model(name, classifier=True, device="cpu"):
    from transformers import ViTConfig, ViTForImageClassification, ViTModel

    hidden, layers, heads, mlp, patch, size = SIZES[name]
    cfg = ViTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=mlp,
                    patch_size=patch, image_size=size, num_labels=10, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):  # initialising ViT-H on the GPU takes seconds, not a minute
        return ViTForImageClassification(cfg) if classifier else ViTModel(cfg, add_pooling_layer=False)


def qv_names(model):
    """PEFT target_modules for query and value: the Linear names inside the attention of this transformers version."""
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    for pair in (["query", "value"], ["q_proj", "v_proj"]):
        if set(pair) <= names:
            return pair
    raise RuntimeError(f"no query/value Linear names among {sorted(names)}")


def export_bundle(model, path):
    """The ViTModel part of `model` as a loratune bundle (same weights)."""
    import hf_vit

    if not os.path.exists(path):
        vit = model.vit if hasattr(model, "vit") else model
        processor = {"size": {"height": 224, "width": 224}, "resample": 2, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
        hf_vit.export(vit.float().cpu().eval(), processor, "random ViT", path)
    return path


def peft_step_benchmark(name, batch, checkpoint, steps=30, phase_steps=5):
    from peft import LoraConfig, get_peft_model

    torch.cuda.empty_cache()  # what the previous run cached
    model = hf_model(name).cuda()
    if checkpoint:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=qv_names(model),
                                             modules_to_save=["classifier"]))
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    scaler = torch.amp.GradScaler("cuda")
    x = torch.randn(batch, 3, 224, 224, device="cuda")
    y = torch.arange(batch, device="cuda") % 10
    phases = [0.0, 0.0, 0.0]

    def step(timed_phases):
        t = time.perf_counter()

        def mark(i):
            nonlocal t
            if timed_phases:
                torch.cuda.synchronize()
                now = time.perf_counter()
                phases[i] += now - t
                t = now

        with torch.autocast("cuda", dtype=torch.float16):
            loss = torch.nn.functional.cross_entropy(model(pixel_values=x).logits.float(), y)
        mark(0)
        scaler.scale(loss).backward()
        mark(1)
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        mark(2)

    times, host = [], []
    torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step(False)
        host.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    for _ in range(phase_steps):
        step(True)
    median = statistics.median(times[steps // 3:])
    result = {"images_per_s": batch / median, "device_peak_allocated": torch.cuda.max_memory_allocated(),
              "host_s": statistics.median(host[steps // 3:]),
              **{k: v / phase_steps for k, v in zip(("forward_s", "backward_s", "optimizer_s"), phases)}}
    return result


def loratune_step(bench, bundle, batch, checkpoint, steps=30, env=None, extra=()):
    cmd = [bench, "step", f"model={bundle}", f"batch={batch}", "precision=fp16", f"checkpoint={int(checkpoint)}",
           f"steps={steps}", "device=cuda", "threads=8", "phase_steps=5", *extra]
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if p.returncode != 0:
        print(f"loratune_bench failed ({p.returncode}): {p.stderr.strip()[-2000:]}")
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
    peft_model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=qv_names(base),
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
    p = subprocess.run([bench, "logits", f"model={bundle}", f"adapter={peft_dir}", f"input={work}/probe.safetensors",
                        f"out={out}"], capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"loratune_bench logits: {p.stderr.strip()[-600:]}")
    got = safetensors_lite.load(out)[0]["logits"]
    lines.append(f"- PEFT adapter in loratune (CPU, fp32): max |logits difference| = {(got - expected).abs().max():.2e}, "
                 f"logits up to {expected.abs().max():.2f}")

    # loratune -> PEFT: a few training steps in loratune, saved, loaded by PEFT on the same base weights.
    lt_dir = os.path.join(work, "loratune_adapter")
    loratune_step(bench, bundle, 4, False, steps=3, extra=("device=cpu", "precision=fp32", "phase_steps=0",
                                                        f"save={lt_dir}", f"probe={work}/probe.safetensors"))
    expected = safetensors_lite.load(f"{work}/probe.safetensors.logits.safetensors")[0]["logits"]
    fresh = hf_model("vit_b16")
    peft_loaded = PeftModel.from_pretrained(fresh, lt_dir).eval()
    with torch.no_grad():
        got = peft_loaded(pixel_values=x.cuda() if next(peft_loaded.parameters()).is_cuda else x).logits.cpu()
    lines.append(f"- loratune adapter in PEFT (CPU, fp32): max |logits difference| = {(got - expected).abs().max():.2e}, "
                 f"logits up to {expected.abs().max():.2f}")


class QVLoRA(torch.nn.Module):
    """LoRA on the q and v rows of a fused qkv Linear: qkv(x) + s * [B_q A_q x, 0, B_v A_v x] (PEFT's initialisation:
    A Kaiming-uniform, B zero)."""

    def __init__(self, qkv, rank=8, alpha=16.0):
        super().__init__()
        self.qkv, self.scale, c = qkv, alpha / rank, qkv.in_features
        self.a = torch.nn.ParameterList([torch.nn.Parameter(torch.empty(rank, c)) for _ in range(2)])
        self.b = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(c, rank)) for _ in range(2)])
        for a in self.a:
            torch.nn.init.kaiming_uniform_(a, a=5 ** 0.5)

    def forward(self, x):
        q, v = ((x @ a.t()) @ b.t() * self.scale for a, b in zip(self.a, self.b))
        return self.qkv(x) + torch.cat([q, torch.zeros_like(q), v], -1)


def qv_lora_tower(model_name, device):
    """open_clip's image tower, reparameterised as the export does, frozen, with QVLoRA on every fused qkv and a
    10-class head: (tower, head, trainable tensors, input size)."""
    import open_clip
    from timm.utils.model import reparameterize_model

    torch.manual_seed(0)
    model = open_clip.create_model(model_name, pretrained=None)
    visual = reparameterize_model(model.visual.eval(), inplace=True).to(device)
    visual.requires_grad_(False)
    for name, module in list(visual.named_modules()):
        if name.endswith("qkv") and isinstance(module, torch.nn.Linear):
            parent, _, child = name.rpartition(".")
            setattr(visual.get_submodule(parent), child, QVLoRA(module).to(device))
    head = torch.nn.Linear(open_clip.get_model_config(model_name)["embed_dim"], 10).to(device)
    trainable = [p for p in list(visual.parameters()) + list(head.parameters()) if p.requires_grad]
    return visual, head, trainable, open_clip.get_model_config(model_name)["vision_cfg"]["image_size"]


def eager_qv_lora_step(model_name, batch, steps=30):
    """Images/s and peak memory of qv_lora_tower's training step in eager PyTorch (no checkpointing)."""
    torch.cuda.empty_cache()
    visual, head, trainable, size = qv_lora_tower(model_name, "cuda")
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    scaler = torch.amp.GradScaler("cuda")
    x = torch.randn(batch, 3, size, size, device="cuda")
    y = torch.arange(batch, device="cuda") % 10
    times = []
    torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.float16):
            loss = torch.nn.functional.cross_entropy(head(visual(x)).float(), y)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"images_per_s": batch / statistics.median(times[steps // 3:]),
            "device_peak_allocated": torch.cuda.max_memory_allocated(), "trainable": sum(p.numel() for p in trainable)}


def mobileclip2(bench, work, lines, raw, model_name="MobileCLIP2-S2"):
    prefix = os.path.join(work, "mobileclip2_s2")
    if not os.path.exists(prefix + "_image.pt"):
        p = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "export", "open_clip_mobileclip.py"), "--model",
                            model_name, "--random-init", "--output", prefix], capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"export: {p.stderr.strip()[-600:]}")
    runs = {"eager": [], "loratune, checkpointing off": [], "loratune, checkpointing on": []}
    for _ in range(2):  # interleaved
        runs["eager"].append(eager_qv_lora_step(model_name, 32))
        runs["loratune, checkpointing off"].append(loratune_step(bench, prefix + "_image.pt", 32, False))
        runs["loratune, checkpointing on"].append(loratune_step(bench, prefix + "_image.pt", 32, True))
    raw["mobileclip2_s2"] = runs
    lines.extend(["| run | images/s | vs eager | peak allocated | vs eager |", "|---|---|---|---|---|"])
    ei = statistics.median(x["images_per_s"] for x in runs["eager"])
    em = max(x["device_peak_allocated"] for x in runs["eager"])
    for who, rs in runs.items():
        if not all(rs):
            lines.append(f"| {who} | failed | | | |")
            continue
        i = statistics.median(x["images_per_s"] for x in rs)
        m = max(x["device_peak_allocated"] for x in rs)
        lines.append(f"| {who} | {i:.1f} | {i / ei:.2f} | {m / 2**30:.2f} GiB | {m / em:.2f} |")


def largest_batch(bench, bundle, limit_gb=12):
    p = subprocess.run([bench, "maxbatch", f"model={bundle}", "precision=fp16", "checkpoint=1", "threads=8"],
                       capture_output=True, text=True, env={**os.environ, "LORATUNE_CUDA_MEMORY_GB": str(limit_gb)})
    if p.returncode != 0:
        return {"largest_batch": f"failed: {p.stderr.strip()[-300:]}", "peak_allocated": -1}
    return json.loads(p.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--parts", default="speed,interop,capped,mobileclip2", help="comma-separated parts to run")
    p.add_argument("--budget-s", type=float, default=400, help="parts not started by then are skipped")
    a = p.parse_args()
    os.makedirs(a.work, exist_ok=True)
    lines = []
    if not torch.cuda.is_available():
        print("no CUDA device: the GPU benchmark needs one (dry run ends here)")
        return
    try:
        import peft
        import transformers
    except ImportError as e:
        print(f"missing {e.name}: carry it as a wheel (see the device tool's README)")
        return
    print(f"transformers {transformers.__version__}, peft {peft.__version__}")
    print("ViTModel children:", [n for n, _ in hf_model("vit_b16", classifier=False).named_children()])
    deadline = time.time() + a.budget_s
    report = os.path.join(a.out, "gpu_benchmark.md")

    def section(title, fn):
        """Runs one part; its lines (or its error) go to the report at once, so a timeout keeps what was done."""
        if time.time() > deadline:
            lines.extend([f"## {title}", "skipped: out of time", ""])
        else:
            t0 = time.time()
            lines.append(f"## {title}")
            try:
                fn()
            except Exception as e:  # report and go on with the next part
                lines.append(f"failed: {type(e).__name__}: {e}")
            lines.extend([f"({time.time() - t0:.0f} s)", ""])
        with open(report, "w") as f:
            f.write("\n".join(lines) + "\n")
        print("\n".join(lines[-12:]), flush=True)

    raw = {}

    def speed():
        bundle = export_bundle(hf_model("vit_b16"), os.path.join(a.work, "vit_b16.pt"))
        lines.extend(["| checkpointing | PEFT images/s | loratune images/s | ratio | PEFT peak | loratune peak | ratio |",
                      "|---|---|---|---|---|---|---|"])
        phase_lines = ["", "Where a step's time goes (s; host = time to issue a step; parts timed on 5 more steps with a",
                       "wait after each part):", "",
                       "| checkpointing | who | step | host | forward | backward | optimizer |", "|---|---|---|---|---|---|---|"]
        for ckpt in (False, True):
            runs = {"peft": [], "loratune": []}
            for r in range(2):  # interleaved
                order = [("peft", lambda: peft_step_benchmark("vit_b16", 32, ckpt)),
                         ("loratune", lambda: loratune_step(a.bench, bundle, 32, ckpt))]
                for who, fn in (order if r == 0 else order[::-1]):
                    runs[who].append(fn())
            raw[f"speed_checkpoint_{ckpt}"] = runs
            if not all(runs["loratune"]):
                lines.append(f"| {'on' if ckpt else 'off'} | loratune failed |")
                continue
            pi = statistics.median(x["images_per_s"] for x in runs["peft"])
            li = statistics.median(x["images_per_s"] for x in runs["loratune"])
            pm = max(x["device_peak_allocated"] for x in runs["peft"])
            lm = max(x["device_peak_allocated"] for x in runs["loratune"])
            lines.append(f"| {'on' if ckpt else 'off'} | {pi:.1f} | {li:.1f} | {li / pi:.2f} | {pm / 2**30:.2f} GiB | "
                         f"{lm / 2**30:.2f} GiB | {lm / pm:.2f} |")
            for who, rs in runs.items():
                x = rs[-1]
                phase_lines.append(f"| {'on' if ckpt else 'off'} | {who} | {32 / x['images_per_s']:.4f} | {x['host_s']:.4f} | "
                                   f"{x['forward_s']:.4f} | {x['backward_s']:.4f} | {x['optimizer_s']:.4f} |")
        lines.extend(phase_lines)

    def capped():
        lines.extend(["| model | largest batch | peak allocated at that batch |", "|---|---|---|"])
        for name in ("vit_b16", "vit_l16", "vit_h14"):
            path = os.path.join(a.work, f"{name}.backbone.pt")
            b = export_bundle(hf_model(name, classifier=False, device="cuda"), path)
            r = largest_batch(a.bench, b)
            raw[f"largest_batch_{name}"] = r
            peak = r.get("peak_allocated", -1)
            lines.append(f"| {name} | {r['largest_batch']} | {peak / 2**30:.2f} GiB |")
            os.remove(path)

    parts = a.parts.split(",")
    if "speed" in parts:
        section("ViT-B/16, LoRA r8 q/v, batch 32, fp16 + loss scaling, AdamW (median of 20 steps after 10)", speed)
    if "interop" in parts:
        section("PEFT interop (ViT-B/16, r8 q/v, same base weights)", lambda: interop(a.bench, a.work, lines))
    if "capped" in parts:
        section("Largest batch that trains in 12 GiB (loratune, LoRA r8 q/v, fp16, checkpointing)", capped)
    if "mobileclip2" in parts:
        section("MobileCLIP2-S2 image tower, LoRA r8 q/v, batch 32 at 256 px, fp16 + loss scaling, AdamW",
                lambda: mobileclip2(a.bench, a.work, lines, raw))
    with open(os.path.join(a.out, "gpu_benchmark.json"), "w") as f:
        json.dump(raw, f, indent=1)

if __name__ == "__main__":
    main()
