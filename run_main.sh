#!/usr/bin/env bash
# Set everything up on a fresh machine and run the main job on its default: compress
# MiniLM-L6 (offline) to half its linear-layer parameters with calibration data, compare the
# methods over budgets, and write the report, plots and compressed weights to tensorpress-out/.
# Extra arguments go to `tensorpress compress` (see `tensorpress compress --help`).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/setup.sh main
tensorpress compress "$@"
