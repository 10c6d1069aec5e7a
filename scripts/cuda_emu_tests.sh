#!/usr/bin/env bash
# The CUDA code paths without a GPU: builds _C_cuda_emu (csrc/**/*.cu compiled as C++ against
# the CPU emulation in csrc/testing/cuda_emu.h) and runs the GPU suite (tests/gpu) and the
# emulator's own tests (tests/cuda_emu) on it.
# Usage: scripts/cuda_emu_tests.sh [asan|tsan|plain] [pytest arguments...]
#   asan  (default) AddressSanitizer + UndefinedBehaviorSanitizer, the whole suite
#   tsan  ThreadSanitizer (run it on the subset marked for it: -m tsan)
#   plain no sanitizer (fastest; for iterating)
# Needs the environment of scripts/setup.sh (the .venv with torch, pybind11, scipy-openblas32).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
san="${1:-asan}"
[ $# -gt 0 ] && shift
py="$repo/.venv/bin/python"
case "$san" in
  # libstdc++ preloaded too: python is a C program, and without it the sanitizer's __cxa_throw
  # interceptor finds no real __cxa_throw and aborts at the first C++ exception
  asan)  flags="address,undefined"; preload="$(g++ -print-file-name=libasan.so) $(g++ -print-file-name=libstdc++.so)" ;;
  tsan)  flags="thread"; preload="$(g++ -print-file-name=libtsan.so) $(g++ -print-file-name=libstdc++.so)" ;;
  plain) flags=""; preload="" ;;
  *) echo "usage: $0 [asan|tsan|plain] [pytest args]" >&2; exit 2 ;;
esac
build="build/cuda-emu-$san"
mkdir -p build
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE= -DTENSORPRESS_CUDA=OFF -DTENSORPRESS_CUDA_EMU=ON \
  -DTENSORPRESS_SANITIZE="$flags" -DPython_EXECUTABLE="$py" -Dpybind11_DIR="$("$py" -m pybind11 --cmakedir)" \
  > "$build.configure.log" 2>&1 || { cat "$build.configure.log"; exit 1; }
cmake --build "$build" --target _C_cuda_emu -j 2
module="$(ls "$build"/_C_cuda_emu*.so)"
export TENSORPRESS_CUDA_EMU_MODULE="$module" TENSORPRESS_CUDA_EMU_SANITIZER="$san"
# the sanitizer runtimes must be loaded first (python itself is not instrumented); leaks are
# not checked (the interpreter keeps its objects), torch's own libraries are not instrumented
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
export TSAN_OPTIONS="ignore_noninstrumented_modules=1:halt_on_error=1:exitcode=66"
# the GPU suite (tests/gpu) on the emulation, and the emulator's own tests; one process per
# core (the emulation runs a launch on one OS thread)
LD_PRELOAD="$preload" "$py" -m pytest -q -p no:cacheprovider -n "${TENSORPRESS_EMU_WORKERS:-2}" \
  tests/gpu tests/cuda_emu "$@"
