#!/usr/bin/env python3
"""Exports a timm VisionTransformer as a loratune model bundle (run where timm is installed).

  python3 scripts/export/timm_vit.py --model vit_base_patch16_224.augreg2_in21k_ft_in1k --output models/vit_base.pt
  python3 scripts/export/timm_vit.py --model vit_base_patch16_224 --checkpoint vit_base.safetensors --output ...
  python3 scripts/export/timm_vit.py --model vit_small_patch14_reg4_dinov2 --image-size 224 --random-init --output ...

Weights: timm's pretrained weights for the tag (downloaded into timm's cache), or --checkpoint (a weights file you
have, read by timm's own loader: no network), or --random-init (no weights, for testing). Plain ViTs, DeiT with a
distillation token and models with register tokens (DINOv2) work. Module paths are model.blocks.N.attn.qkv (PEFT on
the timm model: blocks.N.attn.qkv); the default LoRA targets are the q and v rows of each fused qkv weight.
Preprocessing comes from timm's data config of the model.
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


def create(timm, args):
    """The timm model without its classifier, with the weights the arguments ask for."""
    kwargs = {"num_classes": 0}
    if args.image_size:
        kwargs["img_size"] = args.image_size
    if args.random_init:
        return timm.create_model(args.model, pretrained=False, **kwargs), "random init"
    if args.checkpoint:
        if not os.path.isfile(args.checkpoint):
            raise SystemExit(f"error: checkpoint {args.checkpoint} does not exist")
        # timm's pretrained loader on a local file: it maps the keys, resamples position embeddings to the image
        # size and drops the classifier, exactly as for downloaded weights.
        overlay = {"file": args.checkpoint, "custom_load": False}  # a state dict, not the tag's own file format
        model = timm.create_model(args.model, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
        return model, os.path.basename(args.checkpoint)
    return timm.create_model(args.model, pretrained=True, **kwargs), "pretrained"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="timm model name (with pretrained tag) or hf-hub:... id")
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--checkpoint", help="weights file for that model (.safetensors, .pth, .bin); no download")
    weights.add_argument("--random-init", action="store_true", help="no weights: random initialisation, for testing")
    p.add_argument("--image-size", type=int, help="input resolution (default: the model's own); position embeddings "
                                                  "are resampled to it")
    p.add_argument("--mode", choices=["trace", "script"], default="trace")
    p.add_argument("--output", required=True)
    args = p.parse_args(argv)
    import timm  # noqa: E402  (user's install)

    model, source = create(timm, args)
    if not isinstance(model, timm.models.vision_transformer.VisionTransformer):
        raise SystemExit(f"error: {args.model} is a timm {type(model).__name__}, an architecture this exporter does not "
                         "support; it exports timm's VisionTransformer family (ViT, DeiT, DINOv2, CLIP-style ViTs, "
                         "SigLIP's ViT): pick one of those, or `loratune import` a checkpoint folder it supports")
    model = model.eval().float()
    overrides = {"input_size": (3, args.image_size, args.image_size)} if args.image_size else {}
    data_config = timm.data.resolve_data_config(overrides, model=model)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    name = f"timm {args.model} ({source})"
    export(model, data_config, name, args.output, mode=args.mode)
    print(f"wrote {args.output}: {name}, {model.num_features}-d features, input {data_config['input_size'][-1]}")


if __name__ == "__main__":
    main()
