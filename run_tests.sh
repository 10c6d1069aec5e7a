#!/usr/bin/env bash
# Set everything up on a fresh machine, run the lint gate (ruff) and the test suite (exit status
# is ruff's when it fails, else pytest's; "no tests collected" (5) counts as a failure).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/setup.sh test
# the lint gate first (pyproject.toml [tool.ruff]): fails fast on unused or undefined names
python -m ruff check python tests benchmarks
python -m pytest -q tests "$@"
