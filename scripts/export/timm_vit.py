#!/usr/bin/env python3
"""Exports a timm VisionTransformer as a loratune model bundle (run where timm is installed).

  python3 scripts/export/timm_vit.py --model vit_base_patch16_224.augreg2_in21k_ft_in1k --output models/vit_base.pt

Module paths are model.blocks.N.attn.qkv (PEFT on the timm model: blocks.N.attn.qkv); the default LoRA targets are
the q and v rows of each fused qkv weight. Preprocessing comes from timm's data config.
"""
import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import loratune_export as lx  # noqa: E402


def metadata(model, data_config, name):
    """Bundle metadata from a timm model and its resolved data config (input_size, crop_pct, interpolation, ...)."""
    size = data_config["input_size"][-1]
    return {"family": "vit", "architecture": "timm_vit", "name": name, "feature_dim": model.num_features,
            "image_size": size, "resize_size": int(math.floor(size / data_config.get("crop_pct", 1.0))),
            "interpolation": data_config.get("interpolation", "bicubic"),
            "mean": list(data_config["mean"]), "std": list(data_config["std"]), "module_prefix": "model."}


def export(model, data_config, name, output, mode="trace"):
    return lx.export_bundle(lx.TimmViT(model), metadata(model, data_config, name), output, mode=mode)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="timm model name (with pretrained tag) or hf-hub:... id")
    p.add_argument("--output", required=True)
    args = p.parse_args(argv)
    import timm  # noqa: E402  (user's install)

    model = timm.create_model(args.model, pretrained=True, num_classes=0).eval().float()
    data_config = timm.data.resolve_data_config({}, model=model)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    export(model, data_config, args.model, args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
