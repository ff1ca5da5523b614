#!/usr/bin/env python3
"""Exports an open_clip MobileCLIP2 (S0, S2, B, S3, S4, L-14) or MobileCLIP (S1, S2, B) as two loratune bundles: the
image tower (what you adapt) and the text tower (zero-shot heads, contrastive fine-tuning), with the BPE merges inside.

  python3 scripts/export/open_clip_mobileclip.py --checkpoint MobileCLIP2-S2-OpenCLIP --output models/mobileclip2_s2
  python3 scripts/export/open_clip_mobileclip.py --model MobileCLIP2-S2 --checkpoint open_clip_model.safetensors ...
  python3 scripts/export/open_clip_mobileclip.py --model MobileCLIP2-S3 --random-init --output models/s3_random

writes models/mobileclip2_s2_image.pt and models/mobileclip2_s2_text.pt. Weights: --checkpoint, a folder as published
(open_clip_config.json and the weights: the model and its preprocessing come from the folder) or a weights file of
the --model, read by open_clip's own loader; or --random-init (for testing). The image tower is reparameterised
(timm's reparameterize_model folds the convolution branches; the attention layers are unchanged) and traced in fp32
with gradients enabled on the CPU. Module paths are the CLIP model's own, as PEFT names them on open_clip:
visual.trunk.stages.S.blocks.N.token_mixer.qkv (S0-S4: attention in the last stage, in the last two for S3/S4),
visual.trunk.blocks.N.attn.qkv (B, L-14) and text.transformer.resblocks.N.attn (the text tower's in_proj_weight).
Preprocessing is the release's (open_clip's pretrained config of the model): resize the short side, center crop,
normalise (mean 0 / std 1 for S0, S2, B; OpenAI CLIP's for S3, S4, L-14).
"""
import argparse
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import loratune_export as lx  # noqa: E402


class FastViTImage(lx.BundleWrapper):
    """MCi image towers (timm FastVit). Four stages (MCi0-2): the blocks are the last stage's, everything before them
    is the stem. Five stages (MCi3/4, attention in the last two): the blocks are the stages themselves, so that both
    attention stages train; checkpointing then keeps one tensor per stage."""

    def __init__(self, visual):
        super().__init__()
        self.visual = visual
        self.per_stage = len(visual.trunk.stages) > 4
        self.blocks_path = "visual.trunk.stages" if self.per_stage else f"visual.trunk.stages.{len(visual.trunk.stages) - 1}.blocks"

    def forward(self, images):
        return self.head(self.block_list()(self.stem(images)))

    def stem(self, images):
        trunk = self.visual.trunk
        x = trunk.stem(images)
        if self.per_stage:
            return x
        for stage in trunk.stages[:-1]:
            x = stage(x)
        last = trunk.stages[-1]
        return last.pos_emb(last.downsample(x))

    def head(self, hidden):
        trunk = self.visual.trunk
        return self.visual.head(trunk.forward_head(trunk.final_conv(hidden)))


class TimmViTImage(lx.BundleWrapper):
    """ViT image towers (timm VisionTransformer: MobileCLIP-B's with a convolutional stem, L-14's)."""

    blocks_path = "visual.trunk.blocks"

    def __init__(self, visual):
        super().__init__()
        self.visual = visual

    def forward(self, images):
        return self.head(self.visual.trunk.blocks(self.stem(images)))

    def stem(self, images):
        trunk = self.visual.trunk
        return trunk.norm_pre(trunk.patch_drop(trunk._pos_embed(trunk.patch_embed(images))))

    def head(self, hidden):
        trunk = self.visual.trunk
        return self.visual.head(trunk.forward_head(trunk.norm(hidden)))


class OpenClipText(nn.Module):
    """The text tower of a CustomTextCLIP (model.text): tokens -> unnormalised text embeddings."""

    def __init__(self, text):
        super().__init__()
        self.text = text

    def forward(self, tokens):
        return self.text(tokens)


def image_wrapper(model, timm):
    visual = getattr(model, "visual", None)
    trunk = getattr(visual, "trunk", None)
    if isinstance(trunk, timm.models.fastvit.FastVit):
        return FastViTImage(visual)
    if isinstance(trunk, timm.models.vision_transformer.VisionTransformer):
        return TimmViTImage(visual)
    kind = type(trunk if trunk is not None else visual).__name__
    raise SystemExit(f"error: the image tower is a {kind}; this exporter takes MobileCLIP's timm towers (FastVit MCi, "
                     "VisionTransformer). Plain open_clip ViT CLIPs need no Python: `loratune import` their folder")


def release_preprocessing(open_clip, model_name):
    """The preprocessing of the model's published weights (open_clip's pretrained config), as keyword arguments of
    create_model_and_transforms; none for a model without a release."""
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if not tags:
        return {}
    cfg = open_clip.get_pretrained_cfg(model_name, tags[0])
    keys = {"mean": "image_mean", "std": "image_std", "interpolation": "image_interpolation",
            "resize_mode": "image_resize_mode"}
    return {arg: cfg[key] for key, arg in keys.items() if key in cfg}


def create(open_clip, args):
    """The model, its evaluation transform, its name and where the weights came from."""
    if args.checkpoint and os.path.isdir(args.checkpoint):
        config = os.path.join(args.checkpoint, "open_clip_config.json")
        if not os.path.isfile(config):
            raise SystemExit(f"error: {args.checkpoint} has no open_clip_config.json; give the folder as published "
                             "(e.g. MobileCLIP2-S2-OpenCLIP) or a weights file with --model")
        folder = os.path.basename(os.path.normpath(args.checkpoint))
        model, _, transforms = open_clip.create_model_and_transforms("local-dir:" + os.path.abspath(args.checkpoint))
        return model, transforms, args.model or folder, folder
    if not args.model:
        raise SystemExit("error: --model is needed with a weights file or --random-init (e.g. --model MobileCLIP2-S2)")
    if args.model not in open_clip.list_models():
        mobile = [m for m in open_clip.list_models() if "MobileCLIP" in m]
        raise SystemExit(f"error: open_clip has no model {args.model}; MobileCLIP models it knows: {', '.join(mobile)}")
    if args.checkpoint and not os.path.isfile(args.checkpoint):
        raise SystemExit(f"error: checkpoint {args.checkpoint} does not exist")
    model, _, transforms = open_clip.create_model_and_transforms(args.model, pretrained=None,
                                                                 **release_preprocessing(open_clip, args.model))
    if args.checkpoint:
        open_clip.load_checkpoint(model, args.checkpoint)
        return model, transforms, args.model, os.path.basename(args.checkpoint)
    return model, transforms, args.model, "random init"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="open_clip model name: MobileCLIP2-S0, -S2, -B, -S3, -S4, -L-14, MobileCLIP-S1, "
                                   "-S2, -B (optional with a checkpoint folder)")
    weights = p.add_mutually_exclusive_group(required=True)
    weights.add_argument("--checkpoint", help="a checkpoint folder (open_clip_config.json + weights) or a weights file")
    weights.add_argument("--random-init", action="store_true", help="no weights: random initialisation, for testing")
    p.add_argument("--seed", type=int, default=0, help="--random-init: seed of the initialisation")
    p.add_argument("--merges", help="bpe_simple_vocab_16e6.txt(.gz); default: the copy in your open_clip")
    p.add_argument("--output", required=True, help="prefix of the two output files")
    args = p.parse_args(argv)
    import open_clip  # noqa: E402  (the user's install)
    import timm  # noqa: E402
    from timm.utils.model import reparameterize_model  # noqa: E402

    torch.manual_seed(args.seed)
    model, transforms, name, source = create(open_clip, args)
    model = model.eval().float()
    wrapper = image_wrapper(model, timm)
    reparameterize_model(model.visual, inplace=True)
    text = getattr(model, "text", None)
    if text is None or not hasattr(text, "transformer"):
        raise SystemExit(f"error: {name} has no open_clip text transformer at model.text; this exporter takes "
                         "MobileCLIP's CustomTextCLIP models")
    embed = int(model.text.text_projection.shape[-1])
    logit_scale = min(float(model.logit_scale.exp()), 100.0)
    context = int(getattr(text, "context_length", 77))
    out = args.output
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    text_file = os.path.basename(out) + "_text.pt"
    title = f"{name} ({source})"
    architecture = "open_clip_fastvit" if isinstance(wrapper, FastViTImage) else "open_clip_timm_vit"
    meta = {"family": "mobileclip", "architecture": architecture, "name": title, "feature_dim": embed,
            "text_model": text_file, "logit_scale": logit_scale, "module_prefix": "", **lx.preprocessing(transforms)}
    lx.export_bundle(wrapper, meta, out + "_image.pt", mode="trace")
    merges = lx.read_merges(args.merges or lx.find_merges())
    lx.export_text(OpenClipText(text), merges, {"family": "mobileclip", "architecture": "open_clip_text", "name": title,
                                                "feature_dim": embed, "logit_scale": logit_scale},
                   out + "_text.pt", context_length=context)
    print(f"wrote {out}_image.pt and {out}_text.pt: {title}, {embed}-d embeddings, input {meta['image_size']}")


if __name__ == "__main__":
    main()
