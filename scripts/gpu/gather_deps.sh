#!/usr/bin/env bash
# Gathers, into .gpu (ignored by git, carried to the GPU machine), what the GPU machine lacks: in deps/ nlohmann-json,
# spdlog + fmt (used header-only there) and the googletest sources (built there); in fixtures/models the test models
# and Python references of the CPU build (build/, made by Debian's torch 1.13), so both LibTorch versions load the
# same files; in python/ open_clip and timm from ../shared/upstream (the MobileCLIP2 export and its eager comparison;
# ftfy as its stand-in: open_clip imports it, nothing here uses it).
# Needs Debian's nlohmann-json3-dev, libspdlog-dev, libfmt-dev and googletest (scripts/setup.sh installs them), and
# the fixtures: `bash scripts/build.sh && (cd build && ctest -R generate_)`.
set -euo pipefail
cd "$(dirname "$0")/../.."
DEST=.gpu/deps
FIXTURES=build/fixtures/models
[ -f "$FIXTURES/ref_timm_trace.safetensors" ] || { echo "no fixtures in $FIXTURES: run (cd build && ctest -R generate_)"; exit 1; }
rm -rf .gpu
mkdir -p "$DEST/include"
cp -r /usr/include/nlohmann /usr/include/spdlog /usr/include/fmt "$DEST/include/"
cp -r /usr/src/googletest "$DEST/googletest"
mkdir -p .gpu/fixtures && cp -r "$FIXTURES" .gpu/fixtures/
UPSTREAM=../shared/upstream
mkdir -p .gpu/python
cp -r "$UPSTREAM/open_clip/src/open_clip" "$UPSTREAM/timm/timm" "$UPSTREAM/torch113_standins/ftfy" .gpu/python/
du -sh .gpu
