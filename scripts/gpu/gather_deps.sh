#!/usr/bin/env bash
# Gathers, into .gpu/deps (ignored by git, carried to the GPU machine), the headers the GPU machine lacks:
# nlohmann-json, spdlog + fmt (used header-only there) and the googletest sources (built there).
# Needs Debian's nlohmann-json3-dev, libspdlog-dev, libfmt-dev and googletest (scripts/setup.sh installs them).
set -euo pipefail
cd "$(dirname "$0")/../.."
DEST=.gpu/deps
rm -rf "$DEST"
mkdir -p "$DEST/include"
cp -r /usr/include/nlohmann /usr/include/spdlog /usr/include/fmt "$DEST/include/"
cp -r /usr/src/googletest "$DEST/googletest"
du -sh "$DEST"
