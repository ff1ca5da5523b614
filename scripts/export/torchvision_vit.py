#!/usr/bin/env python3
"""Exports a torchvision VisionTransformer as a loratune model bundle.

  python3 scripts/export/torchvision_vit.py --arch vit_b_16 --weights DEFAULT --output models/vit_b_16.pt
  python3 scripts/export/torchvision_vit.py --random-init --image-size 28 --patch-size 4 --layers 4 --heads 4 \
      --hidden 96 --mlp 192 --output models/tiny.pt

Pretrained weights come from torchvision's cache (torch.hub); --random-init builds the architecture with random
weights (for tests and the demo). Traced with gradients enabled, so nn.MultiheadAttention's inference-only kernel
is not recorded.
"""
import argparse
import os
import sys

import torch
import torchvision
from torchvision.models.vision_transformer import VisionTransformer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import loratune_export as lx  # noqa: E402

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def build(args):
    if args.random_init:
        torch.manual_seed(args.seed)
        model = VisionTransformer(image_size=args.image_size, patch_size=args.patch_size, num_layers=args.layers,
                                  num_heads=args.heads, hidden_dim=args.hidden, mlp_dim=args.mlp)
        meta = {"name": f"torchvision ViT {args.layers}x{args.hidden} p{args.patch_size} (random init, seed {args.seed})",
                "image_size": args.image_size, "resize_size": args.resize_size or args.image_size,
                "interpolation": "bilinear", "mean": args.mean or [0.5] * 3, "std": args.std or [0.5] * 3}
    else:
        weights = torchvision.models.get_model_weights(args.arch).verify(args.weights)
        model = torchvision.models.get_model(args.arch, weights=weights)
        t = weights.transforms()
        meta = {"name": f"torchvision {args.arch} ({weights})", "image_size": t.crop_size[0],
                "resize_size": t.resize_size[0], "interpolation": t.interpolation.value,
                "mean": list(t.mean), "std": list(t.std)}
    model.heads = torch.nn.Identity()
    meta.update({"family": "vit", "architecture": "torchvision_vit", "feature_dim": model.hidden_dim,
                 "module_prefix": "model."})
    return lx.TorchvisionViT(model), meta


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="vit_b_16", help="torchvision model name (vit_b_16, vit_l_16, vit_h_14, ...)")
    p.add_argument("--weights", default="DEFAULT", help="torchvision weights enum name")
    p.add_argument("--random-init", action="store_true", help="random weights with the sizes below")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--resize-size", type=int, default=None, help="short side before the center crop (default: image size)")
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--mlp", type=int, default=3072)
    p.add_argument("--mean", type=float, nargs=3)
    p.add_argument("--std", type=float, nargs=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mode", choices=["trace", "script"], default="trace")
    p.add_argument("--output", required=True)
    args = p.parse_args(argv)
    wrapper, meta = build(args)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    lx.export_bundle(wrapper, meta, args.output, mode=args.mode)
    print(f"wrote {args.output}: {meta['name']}, {meta['feature_dim']}-d features, input {meta['image_size']}")


if __name__ == "__main__":
    main()
