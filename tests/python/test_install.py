"""`cmake --install` of the build tree, then a consumer project (tests/consumer: a dozen lines that load a bundle,
attach an adapter and print logits) configured with find_package(loratune) against the installed tree, built and
run; its logits must equal the merged file's in Python torch. The project's second program includes the vision and
text umbrella headers and trains with one library call: its adapter must have the bytes `loratune train` writes for
the same configuration.

usage: test_install.py BUILD_DIR SOURCE_DIR LORATUNE_BINARY FIXTURE_DIR
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

import torch

BUILD, SOURCE, BIN, FIX = sys.argv[1:5]
TMP = tempfile.mkdtemp(prefix="loratune_install_")


def run(*args):
    p = subprocess.run(list(args), capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"FAILED: {' '.join(args)}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p.stdout


def main():
    prefix = os.path.join(TMP, "prefix")
    run("cmake", "--install", BUILD, "--prefix", prefix)
    for needed in ("include/loratune/model.h", "include/loratune/adapter_binding.h"):
        assert os.path.exists(os.path.join(prefix, needed)), needed
    assert not os.path.exists(os.path.join(prefix, "include/loratune/commands.h")), "CLI headers stay private"
    consumer = os.path.join(TMP, "consumer")
    run("cmake", "-S", os.path.join(SOURCE, "tests", "consumer"), "-B", consumer, "-G", "Ninja",
        "-DCMAKE_BUILD_TYPE=Release", "-DCMAKE_PREFIX_PATH=" + prefix)
    run("cmake", "--build", consumer)
    bundle = os.path.join(FIX, "models", "hf_script.pt")
    adapter = os.path.join(FIX, "models", "adapter_hf_script")
    got = [float(v) for v in run(os.path.join(consumer, "consumer"), bundle, adapter).split()]

    merged = os.path.join(TMP, "merged.pt")
    run(BIN, "merge", "--base", bundle, "--adapter", adapter, "--output", merged)
    with torch.no_grad():
        ref = torch.jit.load(merged)(torch.full((1, 3, 32, 32), 0.5))[0].tolist()
    assert len(got) == len(ref) == 3, (got, ref)
    diff = max(abs(a - b) for a, b in zip(got, ref))
    assert diff < 1e-5, f"consumer logits {got} vs merged {ref}"
    print(f"installed tree used by find_package(loratune): logits match the merged file within {diff:.2g}")

    adapters = []
    for name, program in (("library", [os.path.join(consumer, "consumer_train")]), ("cli", [BIN, "train", "--config"])):
        config = os.path.join(TMP, name + ".json")
        with open(config, "w") as f:
            json.dump({"model": bundle, "data": {"train": os.path.join(FIX, "images", "toy", "train"), "workers": 2},
                       "epochs": 1, "batch_size": 16, "precision": "fp32", "output_dir": os.path.join(TMP, name),
                       "threads": 2}, f)  # pinned: `auto` follows the machine's load, and float sums with it
        run(*program, config)
        with open(os.path.join(TMP, name, "adapter", "adapter_model.safetensors"), "rb") as f:
            adapters.append(f.read())
    assert adapters[0] == adapters[1], "run_training in a program of one's own and `loratune train` differ"
    print("run_training from the installed vision library: the same adapter bytes as `loratune train`")
    print("2 passed, 0 failed")


if __name__ == "__main__":
    try:
        main()
    finally:
        shutil.rmtree(TMP, ignore_errors=True)
