#!/usr/bin/env python3
"""Import time and peak memory of `loratune import` on timm ViT-B/16 and ViT-L/16 checkpoint folders (random fp32
weights, written as timm's save_config_for_hf + model.safetensors), against the size of the weights. Each import
runs in its own process; peak memory is its maximum resident set, less that of `loratune --version` (the process
baseline: libraries). The goal: seconds, and no more than the weights plus one copy.

usage: /usr/bin/python3 scripts/bench/bench_import.py [--binary build/bin/loratune] [--upstream ../shared/upstream]
"""
import argparse
import os
import pathlib
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
from process_peak import measured  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--binary", default=os.path.join(ROOT, "build", "bin", "loratune"))
    p.add_argument("--upstream", default=os.path.join(ROOT, "..", "shared", "upstream"))
    p.add_argument("--models", default="vit_base_patch16_224,vit_large_patch16_224")
    args = p.parse_args()
    sys.path[:0] = [os.path.join(args.upstream, "timm"), os.path.join(ROOT, "tests", "python")]
    import safetensors_lite
    import timm
    from timm.models._hub import save_config_for_hf

    _, baseline = measured([args.binary, "--version"])
    print(f"process baseline (loratune --version): {baseline / 2**20:.0f} MiB")
    print(f"{'model':28s} {'weights':>9s} {'import s':>9s} {'peak MiB':>9s} {'peak-base':>10s} {'x weights':>9s}")
    with tempfile.TemporaryDirectory(prefix="loratune_bench_import_") as tmp:
        for arch in args.models.split(","):
            folder = pathlib.Path(tmp) / arch
            folder.mkdir()
            model = timm.create_model(arch, pretrained=False, num_classes=0)
            safetensors_lite.save(model.state_dict(), folder / "model.safetensors")
            save_config_for_hf(model, folder / "config.json")
            del model
            weights = (folder / "model.safetensors").stat().st_size
            seconds, peak = measured([args.binary, "import", str(folder), "--output", str(folder) + ".pt"])
            print(f"{arch:28s} {weights / 2**20:7.0f} M {seconds:9.1f} {peak / 2**20:9.0f} {(peak - baseline) / 2**20:10.0f}"
                  f" {(peak - baseline) / weights:9.2f}")
            os.remove(str(folder) + ".pt")


if __name__ == "__main__":
    main()
