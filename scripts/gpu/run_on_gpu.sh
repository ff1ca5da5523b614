#!/usr/bin/env bash
# Runs on the GPU machine (device tool), after scripts/gpu/gather_deps.sh here:
#   run(command="bash scripts/gpu/run_on_gpu.sh", carry=[".gpu"])
# Builds the core library, the CUDA tests and the benchmark app against pip torch's LibTorch (no OpenCV there),
# runs the CUDA tests and the PEFT benchmark, and writes logs and tables to $OUT (or ./gpu-out).
# DRY_RUN=1 runs the same steps on a CPU machine (tests skip, Python parts that need CUDA/PEFT say so).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
TORCH_PREFIX=$($PY -c 'import torch; print(torch.utils.cmake_prefix_path)')
JOBS=$(nproc)
start=$(date +%s)
{
  echo "torch: $($PY -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available())')"
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
} | tee "$OUT/environment.txt"

cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" \
  -DLORATUNE_WITH_VISION=OFF -DLORATUNE_DEPS_DIR="$PWD/.gpu/deps" -DLORATUNE_PYTHON="$(command -v $PY)" \
  ${CUDA_ARCH:+-DCMAKE_CUDA_ARCHITECTURES=$CUDA_ARCH} > "$OUT/cmake.log" 2>&1 || { tail -30 "$OUT/cmake.log"; exit 1; }
cmake --build build-gpu -j "$JOBS" --target loratune_cuda_tests loratune_bench > "$OUT/build.log" 2>&1 \
  || { tail -40 "$OUT/build.log"; exit 1; }
echo "built in $(( $(date +%s) - start ))s"

# Fixtures for the CUDA tests (Python torch of this machine).
$PY tests/fixtures/make_vit_fixtures.py build-gpu/fixtures/models > "$OUT/fixtures.log" 2>&1 || tail -5 "$OUT/fixtures.log"
timeout 300 build-gpu/tests/loratune_cuda_tests --gtest_output=xml:"$OUT/cuda_tests.xml" 2>&1 | tee "$OUT/cuda_tests.log" | tail -25

timeout 420 $PY scripts/gpu/bench_peft.py --bench build-gpu/bin/loratune_bench --work build-gpu/bench --out "$OUT" \
  2>&1 | tee "$OUT/bench.log" | tail -40
echo "total $(( $(date +%s) - start ))s"
