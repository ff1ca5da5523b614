#!/usr/bin/env bash
# The demo pipeline with larger settings and three seeds (profile "bench" of scripts/demo/run_demo.py): pretraining on
# all of Fashion-MNIST classes 0-4, then LoRA / full / linear probe on 100 photos per new class, evaluated on the whole
# test split. Writes the table to build/bench_adaptation.md (about 20 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/../.."
/usr/bin/python3 scripts/demo/run_demo.py --profile bench --out build/bench_adaptation --report build/bench_adaptation.md "$@"
