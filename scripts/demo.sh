#!/usr/bin/env bash
# README command 1: installs, builds, and runs the demo on real images (Fashion-MNIST): pretrain a small ViT,
# adapt it to new classes with LoRA / full fine-tuning / a linear probe, evaluate, merge, predict, compare.
# Re-running reuses the photo folders and the pretrained backbone in ./demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build.sh
/usr/bin/python3 scripts/demo/run_demo.py --out demo "$@"
