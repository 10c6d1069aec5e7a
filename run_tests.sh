#!/usr/bin/env bash
# Set everything up on a fresh machine, run the quality gate (ruff, clang-format, mypy), the test
# suite, then the CUDA code on the CPU emulation: the GPU suite under AddressSanitizer + UBSan, its
# tsan-marked subset under ThreadSanitizer (scripts/cuda_emu_tests.sh). The first failure's exit
# status is returned; "no tests collected" (5) counts as a failure. Arguments go to the main pytest
# run.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/setup.sh test
# the quality gate first: ruff's lint and format (pyproject.toml [tool.ruff]), clang-format
# (.clang-format) over csrc, and mypy over python/tensorpress (pyproject.toml [tool.mypy], the
# extension described by python/tensorpress/_C.pyi); the versions are pinned in setup.sh so
# the gate cannot drift
python -m ruff check python tests benchmarks scripts
python -m ruff format --check python tests benchmarks scripts
find csrc \( -name '*.h' -o -name '*.cpp' -o -name '*.cu' \) -print0 | xargs -0 clang-format --dry-run -Werror
python -m mypy
python -m pytest -q tests "$@"
bash scripts/cuda_emu_tests.sh asan
bash scripts/cuda_emu_tests.sh tsan -m tsan
