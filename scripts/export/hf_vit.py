#!/usr/bin/env python3
"""Exports a Hugging Face transformers ViT as a loratune model bundle (run where transformers is installed).

  python3 scripts/export/hf_vit.py --model google/vit-base-patch16-224 --output models/vit_base.pt

Module paths stay those of ViTForImageClassification (vit.encoder.layer.N.attention.attention.query), so adapter
files use PEFT's key names for that model. Traced with gradients enabled, in fp32, on the CPU; use autocast for
reduced precision at training time.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import loratune_export as lx  # noqa: E402

RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic", 1: "area", 4: "area", 5: "area"}  # PIL codes


def metadata(vit_model, processor, name):
    """Bundle metadata from a ViTModel and its image processor settings (a dict or an object with attributes)."""
    get = processor.get if isinstance(processor, dict) else (lambda k, d=None: getattr(processor, k, d))
    size = get("size") or {"height": 224, "width": 224}
    image_size = size["height"] if isinstance(size, dict) else int(size)
    return {"family": "vit", "architecture": "hf_vit", "name": name,
            "feature_dim": vit_model.config.hidden_size if hasattr(vit_model, "config") else vit_model.layernorm.normalized_shape[0],
            # ViTImageProcessor resizes straight to the input size: no crop.
            "image_size": image_size, "resize_size": image_size,
            "interpolation": RESAMPLE.get(int(get("resample", 2)), "bilinear"),
            "mean": list(get("image_mean") or [0.5] * 3), "std": list(get("image_std") or [0.5] * 3),
            "module_prefix": ""}


def export(vit_model, processor, name, output, mode="trace"):
    return lx.export_bundle(lx.HFViT(vit_model), metadata(vit_model, processor, name), output, mode=mode)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="hub id or local folder of a ViTModel / ViTForImageClassification")
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="attention implementation to trace")
    p.add_argument("--output", required=True)
    args = p.parse_args(argv)
    from transformers import AutoImageProcessor, ViTModel  # noqa: E402  (user's install)

    model = ViTModel.from_pretrained(args.model, add_pooling_layer=False, attn_implementation=args.attn).float()
    processor = AutoImageProcessor.from_pretrained(args.model)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    export(model, processor, args.model, args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
