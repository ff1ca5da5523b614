#!/usr/bin/env bash
# Configures and builds loratune in ./build (Release). Extra arguments go to cmake, e.g.
#   bash scripts/build.sh -DCMAKE_PREFIX_PATH=/opt/libtorch     # an official LibTorch 2.x (CUDA)
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${LORATUNE_BUILD_DIR:-build}
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release "$@" >/dev/null
cmake --build "$BUILD_DIR" -j "$(nproc)"
echo "build: $BUILD_DIR/bin/loratune"
