#!/usr/bin/env python3
"""Exports a Hugging Face transformers ViT as a loratune model bundle (run where transformers is installed).

  python3 scripts/export/hf_vit.py --model google/vit-base-patch16-224 --output models/vit_base.pt
  python3 scripts/export/hf_vit.py --checkpoint my_vit/ --output models/my_vit.pt      # save_pretrained folder
  python3 scripts/export/hf_vit.py --model google/vit-base-patch16-224 --random-init --output models/test.pt

Weights: the hub model named by --model (downloaded into the Hugging Face cache), or --checkpoint (a local folder
with config.json, the weights and preprocessor_config.json, as save_pretrained writes it: no network), or
--random-init (the --model's architecture and preprocessing with random weights, for testing).

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
    return lx.export_bundle(lx.hf_vit_wrapper(vit_model), metadata(vit_model, processor, name), output, mode=mode)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="hub id (or local folder) of a ViTModel / ViTForImageClassification")
    p.add_argument("--checkpoint", help="local folder written by save_pretrained (instead of --model); no download")
    p.add_argument("--random-init", action="store_true", help="no weights: random initialisation, for testing")
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="attention implementation to trace")
    p.add_argument("--output", required=True)
    args = p.parse_args(argv)
    if bool(args.model) == bool(args.checkpoint):
        p.error("give exactly one of --model (a hub id) and --checkpoint (a local folder)")
    if args.checkpoint and not os.path.isdir(args.checkpoint):
        raise SystemExit(f"error: checkpoint folder {args.checkpoint} does not exist")
    from transformers import AutoConfig, AutoImageProcessor, ViTModel  # noqa: E402  (user's install)

    source = args.checkpoint or args.model
    local = {"local_files_only": True} if args.checkpoint else {}
    if args.random_init:
        config = AutoConfig.from_pretrained(source, attn_implementation=args.attn, **local)
        model = ViTModel(config, add_pooling_layer=False).float()
    else:
        model = ViTModel.from_pretrained(source, add_pooling_layer=False, attn_implementation=args.attn, **local).float()
    processor = AutoImageProcessor.from_pretrained(source, **local)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    name = f"{source} (random init)" if args.random_init else source
    export(model, processor, name, args.output)
    print(f"wrote {args.output}: {name}")


if __name__ == "__main__":
    main()
