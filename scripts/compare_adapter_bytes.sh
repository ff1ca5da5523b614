#!/usr/bin/env bash
# Refactoring check: trains five seeded runs with two loratune binaries on the test fixtures and compares the
# adapter files byte for byte (sha256). Run after `bash scripts/test.sh` generated build/fixtures.
#   bash scripts/compare_adapter_bytes.sh OLD_BINARY NEW_BINARY
# The runs: hf ViT LoRA (rsLoRA, dropout, accumulation), timm ViT in bf16 with 16-bit frozen weights, checkpointing
# and a rank pattern, MobileCLIP with a zero-shot head, torchvision ViT linear probe, timm ViT DoRA with LoRA+.
set -euo pipefail
cd "$(dirname "$0")/.."
FIX=$PWD/build/fixtures
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
runs() {
  local bin=$1 out=$2
  mkdir -p "$out"
  cat > "$out/a.json" <<JSON
{"model": "$FIX/models/hf_script.pt", "data": {"train": "$FIX/images/toy/train", "val": "$FIX/images/toy/val", "workers": 2},
 "epochs": 2, "batch_size": 8, "grad_accum_steps": 2, "precision": "fp32", "threads": 2,
 "lora": {"rank": 4, "alpha": 8, "dropout": 0.2, "rslora": true}, "optim": {"lr": 0.005, "head_lr": 0.01},
 "output_dir": "$out/a", "seed": 7}
JSON
  cat > "$out/b.json" <<JSON
{"model": "$FIX/models/timm_trace.pt", "data": {"train": "$FIX/images/toy/train", "val": "$FIX/images/toy/val", "workers": 2,
 "augment": {"enabled": false}}, "epochs": 2, "batch_size": 16, "precision": "bf16", "threads": 2, "frozen_dtype": "compute",
 "gradient_checkpointing": true, "lora": {"targets": ["qkv:q,v", "fc1"], "rank_pattern": {"fc1": 2}},
 "output_dir": "$out/b", "seed": 3}
JSON
  cat > "$out/c.json" <<JSON
{"model": "$FIX/models/mobileclip_trace.pt", "data": {"train": "$FIX/models/zeroshot", "val": "$FIX/models/zeroshot", "workers": 2},
 "epochs": 1, "batch_size": 3, "precision": "fp32", "threads": 2, "head": {"init": "zero_shot"}, "optim": {"lr": 1e-4}, "output_dir": "$out/c"}
JSON
  cat > "$out/d.json" <<JSON
{"model": "$FIX/models/torchvision_script.pt", "data": {"train": "$FIX/images/toy/train", "val_fraction": 0.2, "workers": 2},
 "epochs": 1, "batch_size": 8, "precision": "fp32", "threads": 2, "method": "linear_probe", "output_dir": "$out/d"}
JSON
  cat > "$out/e.json" <<JSON
{"model": "$FIX/models/timm_script.pt", "data": {"train": "$FIX/images/toy/train", "val": "$FIX/images/toy/val", "workers": 2},
 "epochs": 1, "batch_size": 8, "precision": "fp32", "threads": 2, "lora": {"variant": "dora", "rank": 4},
 "optim": {"lora_plus_ratio": 16}, "output_dir": "$out/e", "seed": 11}
JSON
  for r in a b c d e; do "$bin" train --config "$out/$r.json" > "$out/$r.log" 2>&1 || { echo "run $r failed:"; tail "$out/$r.log"; exit 1; }; done
  (cd "$out" && sha256sum ./*/adapter/adapter_model.safetensors ./*/best/adapter_model.safetensors ./*/adapter/adapter_config.json)
}
runs "$1" "$OUT/old" > "$OUT/old.sha"
runs "$2" "$OUT/new" > "$OUT/new.sha"
cat "$OUT/new.sha"
if diff <(awk '{print $1}' "$OUT/old.sha") <(awk '{print $1}' "$OUT/new.sha") >/dev/null; then
  echo "identical: all adapter files have the same bytes"
else
  echo "DIFFERENT:"; diff "$OUT/old.sha" "$OUT/new.sha"; exit 1
fi
