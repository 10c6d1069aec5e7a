#!/usr/bin/env bash
# Set everything up on a fresh machine, run the lint gate (ruff), the test suite, then the CUDA
# code on the CPU emulation: the GPU suite under AddressSanitizer + UBSan, its tsan-marked subset
# under ThreadSanitizer (scripts/cuda_emu_tests.sh). The first failure's exit status is returned;
# "no tests collected" (5) counts as a failure. Arguments go to the main pytest run.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/setup.sh test
# the lint gate first (pyproject.toml [tool.ruff]): fails fast on unused or undefined names
python -m ruff check python tests benchmarks scripts
python -m pytest -q tests "$@"
bash scripts/cuda_emu_tests.sh asan
bash scripts/cuda_emu_tests.sh tsan -m tsan
