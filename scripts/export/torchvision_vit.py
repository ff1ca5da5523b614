#!/usr/bin/env python3
"""Exports a torchvision VisionTransformer as a loratune model bundle.

  python3 scripts/export/torchvision_vit.py --arch vit_b_16 --output models/vit_b_16.pt                # DEFAULT weights
  python3 scripts/export/torchvision_vit.py --arch vit_b_16 --checkpoint vit_b_16-c867db91.pth --output ...
  python3 scripts/export/torchvision_vit.py --arch vit_l_16 --random-init --output models/test_l16.pt
  python3 scripts/export/torchvision_vit.py --arch custom --random-init --image-size 28 --patch-size 4 --layers 4 \
      --heads 4 --hidden 96 --mlp 192 --output models/tiny.pt

Weights: the torchvision weights named by --weights (downloaded into torch.hub's cache), or --checkpoint (a state
dict file you have: no network), or --random-init (no weights, for testing). The image size and preprocessing come
from the --weights entry of that architecture in every case (a weights file must fit it). `--arch custom` builds a
VisionTransformer of the sizes given (random init only; preprocessing from --mean/--std). Traced with gradients
enabled, so nn.MultiheadAttention's inference-only kernel is not recorded.
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


def load_state_dict(path):
    if not os.path.isfile(path):
        raise SystemExit(f"error: checkpoint {path} does not exist")
    state = torch.load(path, map_location="cpu")
    for key in ("model", "state_dict"):  # training checkpoints wrap the weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


def build(args):
    if args.arch == "custom":
        if not args.random_init:
            raise SystemExit("error: --arch custom has no weights; add --random-init, or name a torchvision architecture")
        torch.manual_seed(args.seed)
        model = VisionTransformer(image_size=args.image_size, patch_size=args.patch_size, num_layers=args.layers,
                                  num_heads=args.heads, hidden_dim=args.hidden, mlp_dim=args.mlp)
        meta = {"name": f"torchvision ViT {args.layers}x{args.hidden} p{args.patch_size} (random init, seed {args.seed})",
                "image_size": args.image_size, "resize_size": args.resize_size or args.image_size,
                "interpolation": "bilinear", "mean": args.mean or [0.5] * 3, "std": args.std or [0.5] * 3}
    else:
        try:
            weights = torchvision.models.get_model_weights(args.arch).verify(args.weights)
        except (KeyError, ValueError) as e:
            raise SystemExit(f"error: {args.arch} / weights {args.weights}: {e}")
        t = weights.transforms()
        if args.random_init or args.checkpoint:
            torch.manual_seed(args.seed)
            model = torchvision.models.get_model(args.arch, weights=None, image_size=t.crop_size[0])
            if args.checkpoint:
                model.load_state_dict(load_state_dict(args.checkpoint))
            source = f"random init, seed {args.seed}" if args.random_init else os.path.basename(args.checkpoint)
        else:
            model = torchvision.models.get_model(args.arch, weights=weights)
            source = str(weights)
        meta = {"name": f"torchvision {args.arch} ({source})", "image_size": t.crop_size[0],
                "resize_size": t.resize_size[0], "interpolation": t.interpolation.value,
                "mean": list(t.mean), "std": list(t.std)}
    model.heads = torch.nn.Identity()
    meta.update({"family": "vit", "architecture": "torchvision_vit", "feature_dim": model.hidden_dim,
                 "module_prefix": "model."})
    return lx.TorchvisionViT(model), meta


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="vit_b_16",
                   help="torchvision model name (vit_b_16, vit_b_32, vit_l_16, vit_l_32, vit_h_14) or custom")
    p.add_argument("--weights", default="DEFAULT", help="torchvision weights name (IMAGENET1K_V1, ...): what is "
                                                       "downloaded, and where image size and preprocessing come from")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", help="state dict file of those weights (.pth); no download")
    source.add_argument("--random-init", action="store_true", help="no weights: random initialisation, for testing")
    p.add_argument("--image-size", type=int, default=224, help="custom only, like the sizes below")
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
