#!/usr/bin/env bash
# Runs on the GPU machine (device tool), after scripts/gpu/gather_deps.sh here:
#   run(command="bash scripts/gpu/run_on_gpu.sh", carry=[".gpu"])
# Builds the core library, the C++ tests and the benchmark app against pip torch's LibTorch (no OpenCV there), runs
# the CUDA tests, the PEFT benchmark, then the CPU test suites on LibTorch 2.x, and writes logs and tables to $OUT
# (or ./gpu-out) as it goes. Each step is bounded; the whole run takes about 7 minutes on 16 cores.
# BENCH_PARTS (speed,interop,capped,mobileclip2) and CPU_SUITES (core merge training; empty: none) choose what runs.
# DRY_RUN=1 runs the same steps on a CPU machine (tests skip, Python parts that need CUDA/PEFT say so).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
TORCH_PREFIX=$($PY -c 'import torch; print(torch.utils.cmake_prefix_path)')
JOBS=$(nproc)
start=$(date +%s)
elapsed() { echo "$(( $(date +%s) - start ))s"; }
echo "torch: $($PY -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available())')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
echo "cores: $JOBS"
# At most 8 files come back from the device tool: build.log, cuda_tests.log, import.log, bench.log,
# gpu_benchmark.{md,json}, cpu_tests.log.

timeout 120 cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" \
  -DLORATUNE_WITH_VISION=OFF -DLORATUNE_DEPS_DIR="$PWD/.gpu/deps" -DLORATUNE_PYTHON="$(command -v $PY)" \
  > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
grep -E "loratune: LibTorch" "$OUT/build.log"
TARGETS="loratune_cuda_tests loratune_bench loratune_core_tests loratune_training_tests loratune_merge_tests"
timeout 300 cmake --build build-gpu -j "$JOBS" --target $TARGETS >> "$OUT/build.log" 2>&1 \
  || { grep -E "error|Error" "$OUT/build.log" | head -40; tail -20 "$OUT/build.log"; exit 1; }
echo "built in $(elapsed)"

# Test models and Python references made here by Debian's torch 1.13 (scripts/gpu/gather_deps.sh): the same files
# the CPU suites use, loaded by LibTorch 2.x.
mkdir -p build-gpu/fixtures && cp -r .gpu/fixtures/models build-gpu/fixtures/
timeout 120 build-gpu/tests/loratune_cuda_tests > "$OUT/cuda_tests.log" 2>&1
echo "CUDA tests: exit $? after $(elapsed)"; grep -E "^\[  (FAILED|PASSED|SKIPPED) |OK \]|peak|Failure|error" "$OUT/cuda_tests.log" | head -30

# Native import against transformers' own forward (issue: checkpoint folders without Python); seconds, CPU only.
if [ -z "${SKIP_IMPORT_CHECK:-}" ]; then
  timeout 120 $PY scripts/gpu/check_import.py --bench build-gpu/bin/loratune_bench > "$OUT/import.log" 2>&1
  echo "import check: exit $? after $(elapsed)"; cat "$OUT/import.log" | tail -12
fi

PYTHONPATH="$PWD/.gpu/python${PYTHONPATH:+:$PYTHONPATH}" timeout 280 $PY scripts/gpu/bench_peft.py \
  --bench build-gpu/bin/loratune_bench --work build-gpu/bench --out "$OUT" --budget-s 190 \
  --parts "${BENCH_PARTS:-speed,interop,capped,mobileclip2}" > "$OUT/bench.log" 2>&1
echo "benchmark: exit $? after $(elapsed)"; cat "$OUT/gpu_benchmark.md" 2>/dev/null || tail -30 "$OUT/bench.log"

# The CPU suites on LibTorch 2.x, while time is left (each bounded); a crash gets a backtrace from cuda-gdb.
for suite in ${CPU_SUITES-core merge training}; do
  timeout 60 build-gpu/tests/loratune_${suite}_tests > "$OUT/suite.log" 2>&1
  rc=$?
  echo "$suite tests: exit $rc after $(elapsed)"; grep -E "FAILED|PASSED|Failure" "$OUT/suite.log" | head -12
  { echo "== $suite: exit $rc"; grep -vE "^\[       OK|^\[ RUN" "$OUT/suite.log"; } >> "$OUT/cpu_tests.log"
  if [ $rc -ge 128 ] && [ $rc -ne 124 ] && command -v cuda-gdb > /dev/null; then
    crashed=$(grep -E "^\[ RUN" "$OUT/suite.log" | tail -1 | awk '{print $4}')
    echo "crashed in $crashed" | tee -a "$OUT/cpu_tests.log"
    timeout 90 cuda-gdb -batch -ex run -ex bt --args build-gpu/tests/loratune_${suite}_tests --gtest_filter="$crashed" \
      2>&1 | grep -E "^#|signal|SIG" | head -40 | tee -a "$OUT/cpu_tests.log"
  fi
done
rm -f "$OUT/suite.log"
echo "total $(elapsed)"
