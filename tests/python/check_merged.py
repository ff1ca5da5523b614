"""Loads every merged file the C++ merge tests wrote with torch.jit.load and compares its logits with the logits
the C++ adapted (unmerged) model produced on the same input."""
import glob
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import safetensors_lite  # noqa: E402

TOLERANCE = 1e-5


def main():
    merged_dir = sys.argv[1]
    files = sorted(glob.glob(os.path.join(merged_dir, "*.expected.safetensors")))
    if not files:
        print(f"no merged files in {merged_dir}")
        return 1
    failures = 0
    for expected_path in files:
        name = os.path.basename(expected_path)[: -len(".expected.safetensors")]
        expected, _ = safetensors_lite.load(expected_path)
        model = torch.jit.load(os.path.join(merged_dir, name + ".pt")).eval()
        with torch.no_grad():
            logits = model(expected["input"])
        err = (logits - expected["logits"]).abs().max().item()
        ok = err <= TOLERANCE
        failures += not ok
        print(f"{name}: max |python(merged) - c++(adapted)| = {err:.2e} {'ok' if ok else 'FAIL'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
