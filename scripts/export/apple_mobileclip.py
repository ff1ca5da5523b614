#!/usr/bin/env python3
"""Exports MobileCLIP (apple/ml-mobileclip) as two loratune bundles: the image encoder (what you adapt) and the text
encoder (for zero-shot classification and a zero-shot initial head), with the BPE merges file inside.

  python3 scripts/export/apple_mobileclip.py --model mobileclip_s0 --checkpoint mobileclip_s0.pt --output models/mobileclip_s0

writes models/mobileclip_s0_image.pt and models/mobileclip_s0_text.pt. Weights: Apple's checkpoint (--checkpoint),
or --random-init (no weights, for testing; the text projection, which Apple leaves uninitialised, gets a normal
initialisation). `create_model_and_transforms` reparameterises the model (branches folded; the fused qkv layers are
unchanged); it is then traced in fp32 with gradients enabled on the CPU (scripting fails on these encoders; a trace
fixes device and dtype, so use autocast for reduced precision). Preprocessing comes from the transforms Apple's
package returns for the model: resize the short side (bilinear), center crop 256 (S0-S2) or 224 (B), scale to
[0, 1], no normalisation.
"""
import argparse
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import loratune_export as lx  # noqa: E402

class MobileCLIPImage(lx.BundleWrapper):
    """MCi image encoders (S0, S1, S2): attention only in the last stage, network.7. Paths keep Apple's names."""

    blocks_path = "image_encoder.model.network.7"

    def __init__(self, image_encoder):
        super().__init__()
        self.image_encoder = image_encoder

    def forward(self, images):
        return self.head(self.image_encoder.model.network[7](self.stem(images)))

    def stem(self, images):
        m = self.image_encoder.model
        x = m.patch_embed(images)
        for i in range(7):
            x = m.network[i](x)
        return x

    def head(self, hidden):
        m = self.image_encoder.model
        return m.head(m.conv_exp(hidden))


class MobileCLIPViTImage(lx.BundleWrapper):
    """MobileCLIP-B image encoder: ViT-B/16 with a convolutional stem."""

    blocks_path = "image_encoder.model.transformer"

    def __init__(self, image_encoder):
        super().__init__()
        self.image_encoder = image_encoder

    def forward(self, images):
        return self.head(self.image_encoder.model.transformer(self.stem(images)))

    def stem(self, images):
        return self.image_encoder.model.extract_patch_embeddings(images)[0]

    def head(self, hidden):
        m = self.image_encoder.model
        return m.classifier(m.post_transformer_norm(hidden)[:, 0])


class MobileCLIPText(nn.Module):
    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, tokens):
        return self.text_encoder(tokens)


def export_image(image_encoder, vit, meta, path):
    wrapper = (MobileCLIPViTImage if vit else MobileCLIPImage)(image_encoder)
    meta = {"family": "mobileclip", "architecture": "mobileclip_vit" if vit else "mobileclip_mci",
            "interpolation": "bilinear", "mean": [0.0] * 3, "std": [1.0] * 3, "module_prefix": "", **meta}
    return lx.export_bundle(wrapper, meta, path, mode="trace")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="mobileclip_s0, mobileclip_s1, mobileclip_s2 or mobileclip_b")
    weights = p.add_mutually_exclusive_group(required=True)
    weights.add_argument("--checkpoint", help="the .pt checkpoint from Apple")
    weights.add_argument("--random-init", action="store_true", help="no weights: random initialisation, for testing")
    p.add_argument("--seed", type=int, default=0, help="--random-init: seed of the initialisation")
    p.add_argument("--merges", help="bpe_simple_vocab_16e6.txt(.gz); default: the copy in your mobileclip/open_clip")
    p.add_argument("--output", required=True, help="prefix of the two output files")
    args = p.parse_args(argv)
    if args.checkpoint and not os.path.isfile(args.checkpoint):
        raise SystemExit(f"error: checkpoint {args.checkpoint} does not exist")
    import mobileclip  # noqa: E402  (the user's install)

    torch.manual_seed(args.seed)
    model, _, transforms = mobileclip.create_model_and_transforms(args.model, pretrained=args.checkpoint)
    model = model.eval().float()
    if args.random_init:
        projection = model.text_encoder.projection_layer
        with torch.no_grad():
            projection.normal_(0.0, projection.shape[0] ** -0.5)
    vit = hasattr(model.image_encoder.model, "transformer")
    logit_scale = min(float(model.logit_scale.exp()), 100.0) if hasattr(model, "logit_scale") else 100.0
    embed = model.text_encoder.projection_layer.shape[1]
    merges = lx.read_merges(args.merges or lx.find_merges())
    out = args.output
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    text_file = os.path.basename(out) + "_text.pt"
    source = "random init" if args.random_init else os.path.basename(args.checkpoint)
    name = f"{args.model} ({source})"
    export_image(model.image_encoder, vit, {"name": name, "feature_dim": embed, "text_model": text_file,
                                            "logit_scale": logit_scale, **lx.preprocessing(transforms)}, out + "_image.pt")
    lx.export_text(MobileCLIPText(model.text_encoder), merges,
                   {"family": "mobileclip", "name": name, "feature_dim": embed, "logit_scale": logit_scale}, out + "_text.pt")
    print(f"wrote {out}_image.pt and {out}_text.pt")


if __name__ == "__main__":
    main()
