#!/usr/bin/env bash
# Installs what loratune needs on Debian bookworm (run as root, or with sudo available). Idempotent: does nothing
# when everything is already installed.
set -euo pipefail

PACKAGES=(
  g++ cmake ninja-build pkg-config
  libtorch-dev                 # LibTorch 1.13 (CPU); GPU users build against an official LibTorch 2.x instead
  libopenblas0-openmp          # without it Debian's torch falls back to reference BLAS (46x slower)
  libopencv-dev                # image decoding, resizing, PNG plots (+ freetype module for text)
  libcli11-dev nlohmann-json3-dev libspdlog-dev libgtest-dev
  libicu-dev                   # Unicode letter/number classes for the CLIP tokenizer
  libgloo-dev                  # headers of the collectives library LibTorch's c10d uses (data-parallel training)
  python3-torch python3-torchvision python3-pil python3-numpy   # test fixtures, export scripts, references
  python3-regex python3-tqdm   # what open_clip (shared/upstream) imports, for the import tests
  python3-sentencepiece        # trains the small SentencePiece model the tokenizer test compares with
  dataset-fashion-mnist        # real images for the demo
  fonts-nanum                  # a font with Hangul, so Korean class names render in plots
  chromium python3-websocket   # the report's tests open it in headless Chromium (DevTools protocol)
  python3-onnx                 # the ONNX checker, for the export tests (ONNX Runtime itself comes from npm)
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "setup: all packages present"
  exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "setup: installing ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "setup: done"
