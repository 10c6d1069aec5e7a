#!/usr/bin/env bash
# Set everything up on a fresh machine and run the test suite (exit status is pytest's;
# "no tests collected" (5) counts as a failure).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/setup.sh test
python -m pytest -q tests "$@"
