#!/usr/bin/env python3
"""Native import against transformers itself (run where transformers is installed: the GPU machine): small random
ViT, DeiT, DINOv2 (with and without registers), CLIP (both towers) and SigLIP models, saved with save_pretrained
(safetensors), imported by `loratune_bench import` (the library's import, no Python), loaded back with
torch.jit.load and compared with the transformers model's own features on the same input. Prints one line per
model and exits 1 if any differs by more than 1e-4 (relative to the largest feature).

usage: python3 scripts/gpu/check_import.py --bench build-gpu/bin/loratune_bench [--work DIR]
"""
import argparse
import os
import subprocess
import sys
import tempfile

import torch


def pooled(output):
    return output if torch.is_tensor(output) else output.pooler_output


def cases(transformers):
    t = transformers
    small = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    vit = dict(small, image_size=32, patch_size=8, hidden_act="gelu")
    yield "vit", t.ViTModel(t.ViTConfig(**vit), add_pooling_layer=False), lambda m, x: m(pixel_values=x).last_hidden_state[:, 0], 32
    yield "deit", t.DeiTModel(t.DeiTConfig(**vit), add_pooling_layer=False), \
        lambda m, x: (lambda h: (h[:, 0] + h[:, 1]) / 2)(m(pixel_values=x).last_hidden_state), 32
    dino = dict(small, image_size=28, patch_size=14, layerscale_value=0.5)
    yield "dinov2", t.Dinov2Model(t.Dinov2Config(**dino)), lambda m, x: m(pixel_values=x).pooler_output, 28
    yield "dinov2_reg", t.Dinov2WithRegistersModel(t.Dinov2WithRegistersConfig(**dino, num_register_tokens=4)), \
        lambda m, x: m(pixel_values=x).pooler_output, 28
    yield "dinov2_swiglu", t.Dinov2Model(t.Dinov2Config(**dino, use_swiglu_ffn=True)), \
        lambda m, x: m(pixel_values=x).pooler_output, 28
    clip = t.CLIPConfig(vision_config=dict(small, image_size=32, patch_size=8),
                        text_config=dict(small, vocab_size=1000, max_position_embeddings=16, eos_token_id=999),
                        projection_dim=32)
    yield "clip", t.CLIPModel(clip), lambda m, x: pooled(m.get_image_features(pixel_values=x)), 32
    siglip = t.SiglipVisionConfig(**small, image_size=32, patch_size=8)
    yield "siglip", t.SiglipVisionModel(siglip), lambda m, x: m(pixel_values=x).pooler_output, 32


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", required=True)
    p.add_argument("--work", default=tempfile.mkdtemp(prefix="loratune_check_import_"))
    args = p.parse_args()
    import transformers
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    failures = 0
    torch.manual_seed(0)
    for name, model, features, size in cases(transformers):
        model = model.float().eval()
        with torch.no_grad():
            for prm in model.parameters():
                prm.add_(torch.randn_like(prm) * 0.05)
        folder = os.path.join(args.work, name)
        model.save_pretrained(folder, safe_serialization=True)
        bundle = folder + ".pt"
        x = torch.randn(2, 3, size, size)
        try:
            subprocess.run([args.bench, "import", f"source={folder}", f"output={bundle}"], check=True,
                           capture_output=True, text=True)
            with torch.no_grad():
                ref = features(model, x)
                got = torch.jit.load(bundle)(x)
                err = float((got - ref).abs().max() / ref.abs().max())
                if name == "clip":
                    with open(os.path.join(folder, "merges.txt"), "w") as f:
                        f.write("#version: 0.2\nh e\n")
                    subprocess.run([args.bench, "import", f"source={folder}", f"output={folder}_text.pt", "tower=text"],
                                   check=True, capture_output=True, text=True)
                    ids = torch.randint(1, 998, (2, 16))
                    ids[:, 9] = 999
                    ref_text = pooled(model.get_text_features(input_ids=ids))
                    err = max(err, float((torch.jit.load(folder + "_text.pt")(ids) - ref_text).abs().max() / ref_text.abs().max()))
        except subprocess.CalledProcessError as e:
            print(f"{name:14s} import failed: {e.stderr.strip()}")
            failures += 1
            continue
        except Exception as e:  # a layout this transformers version writes differently
            print(f"{name:14s} failed: {type(e).__name__}: {e}")
            failures += 1
            continue
        ok = err < 1e-4
        failures += not ok
        print(f"{name:14s} max relative difference {err:.2e} {'ok' if ok else 'DIFFERS'}")
    print(f"{7 - failures} passed, {failures} failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
