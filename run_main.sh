#!/usr/bin/env bash
# Set everything up on a fresh machine and run the main job on its default: for now the
# fused TT layer benchmark against dense nn.Linear and the peers (results/ + PNG).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/setup.sh bench
python benchmarks/bench_tt.py "$@"
