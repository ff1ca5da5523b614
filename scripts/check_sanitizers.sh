#!/usr/bin/env bash
# Builds the core library and the tokenizers (no OpenCV) and their C++ tests with AddressSanitizer +
# UndefinedBehaviorSanitizer in ./build-sanitize and runs them: the safetensors/adapter/checkpoint-folder readers',
# bundle loader's and tokenizers' fuzz loops, the training loop (resume, accumulation, checkpointing), merges and LoRA
# references against Python. Any sanitizer report fails the run. Needs the fixtures that `bash scripts/test.sh`
# generates (it runs their generators itself if missing).
#   bash scripts/check_sanitizers.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
BUILD_DIR=${LORATUNE_SANITIZE_DIR:-build-sanitize}
# vptr checks need RTTI for LibTorch classes that it does not export (c10::DynamicType).
FLAGS="-fsanitize=address,undefined -fno-sanitize=vptr -fno-sanitize-recover=undefined -fno-omit-frame-pointer"
# The parametrised quantisation and offload suites repeat the same code paths on every layout: under the sanitizers
# they run on the timm layouts only; the CUDA tests skip on the CPU.
GTEST_FILTER="-Cuda.*:Layouts/Offload.*/hf_trace*:Layouts/Offload.*/torchvision_script*"
GTEST_FILTER+=":Layouts/QuantizedLayouts.*/hf_trace*:Layouts/QuantizedLayouts.*/torchvision_script*"
# -O1 with line tables only: what sanitizer reports need, at half the compile time of -O2 -g. One ctest entry per test
# binary: LibTorch's start-up under ASan costs about 2 CPU-s a process.
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Sanitize -DCMAKE_CXX_FLAGS_SANITIZE="-O1 -g1 -DNDEBUG" \
  -DLORATUNE_WITH_VISION=OFF -DLORATUNE_BUILD_BENCH=OFF -DCMAKE_UNITY_BUILD=ON \
  -DLORATUNE_TESTS_PER_BINARY=ON -DLORATUNE_GTEST_FILTER="$GTEST_FILTER" \
  -DCMAKE_CXX_FLAGS="$FLAGS" -DCMAKE_EXE_LINKER_FLAGS="-fsanitize=address,undefined" >/dev/null
cmake --build "$BUILD_DIR" -j "$(nproc)"
# LibTorch is not instrumented and keeps allocations until exit: leaks are not ours to judge here.
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:strict_string_checks=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export OMP_WAIT_POLICY=PASSIVE  # as scripts/test.sh: tests side by side, threads that wait sleep
cd "$BUILD_DIR"
ctest --output-on-failure -j "$(nproc)" -E "^export_scripts$"
