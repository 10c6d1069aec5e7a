#!/usr/bin/env bash
# The one command for a machine with a GPU: build tensorpress with its CUDA kernels, run the
# GPU suite and the full tests, run the kernels under compute-sanitizer (memcheck and
# racecheck), then the CUDA benchmarks (results/tt_<gpu>.{md,json}, results/svd_<gpu>.{md,json}).
#
#   bash benchmarks/gpu_check.sh            # everything
#   QUICK=1 bash benchmarks/gpu_check.sh    # quick benchmarks (--quick)
#   SKIP_FULL_TESTS=1 ...                   # only the GPU suite, not the whole test suite
#
# Logs go to $LOG_DIR (default benchmarks/results/gpu_check_logs/, or $OUT/ when set, as on
# the lent device machines). Stops at the first failing stage and says which.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
LOG_DIR=${LOG_DIR:-${OUT:-$ROOT/benchmarks/results/gpu_check_logs}}
mkdir -p "$LOG_DIR"
PY=${PYTHON:-python}
if [ -f .venv/bin/activate ] && [ -z "${VIRTUAL_ENV:-}" ]; then . .venv/bin/activate; PY=python; fi

stage() { echo; echo "=== $1 ($(date +%T))"; }
fail() { echo "gpu_check: FAILED at stage: $1 (log: $2)"; exit 1; }

stage "environment"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$LOG_DIR/gpu.txt"
nvcc --version | tail -2
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"

stage "build with CUDA (TENSORPRESS_CUDA=ON)"
start=$(date +%s)
TENSORPRESS_CUDA=ON $PY -m pip install --no-build-isolation --no-deps -v . > "$LOG_DIR/build.log" 2>&1 \
  || fail build "$LOG_DIR/build.log"
echo "build: $(( $(date +%s) - start )) s"
# the source tree's copy of the extension is what PYTHONPATH=python picks up
cp "$(ls "$($PY -c 'import site; print(site.getsitepackages()[0])')"/tensorpress/_C*.so)" python/tensorpress/
export PYTHONPATH=$ROOT/python
$PY -c "import tensorpress as tp, json; i = tp.info(); print(json.dumps({k: i[k] for k in ('cuda_kernels_built', 'cuda_archs', 'cuda_devices_seen_by_extension')}))
assert i['cuda_kernels_built'] and i['cuda_devices_seen_by_extension'], 'the build has no CUDA kernels or sees no GPU'"

stage "GPU test suite (tests/gpu)"
$PY -m pytest -q -rs tests/gpu > "$LOG_DIR/tests_gpu.log" 2>&1 || { tail -40 "$LOG_DIR/tests_gpu.log"; fail "tests/gpu" "$LOG_DIR/tests_gpu.log"; }
tail -5 "$LOG_DIR/tests_gpu.log"
if grep -q "SKIPPED" "$LOG_DIR/tests_gpu.log"; then fail "tests/gpu (tests were skipped on a GPU machine)" "$LOG_DIR/tests_gpu.log"; fi

if [ -z "${SKIP_FULL_TESTS:-}" ]; then
  stage "full test suite"
  $PY -m pytest -q -rs tests > "$LOG_DIR/tests_full.log" 2>&1 || { tail -40 "$LOG_DIR/tests_full.log"; fail "full tests" "$LOG_DIR/tests_full.log"; }
  tail -5 "$LOG_DIR/tests_full.log"
fi

stage "compute-sanitizer memcheck + racecheck"
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1 || true)
[ -n "$SAN" ] || fail "compute-sanitizer not found" "-"
for tool in memcheck racecheck; do
  "$SAN" --tool $tool --error-exitcode 3 --target-processes all $PY tests/gpu/sanitize_kernels.py \
    > "$LOG_DIR/sanitize_$tool.log" 2>&1 || fail "compute-sanitizer $tool" "$LOG_DIR/sanitize_$tool.log"
  tail -3 "$LOG_DIR/sanitize_$tool.log"
done

stage "benchmarks"
BENCH_ARGS="--device cuda"
if [ -n "${QUICK:-}" ]; then BENCH_ARGS="$BENCH_ARGS --quick"; fi
for b in bench_tt bench_svd; do
  $PY benchmarks/$b.py $BENCH_ARGS > "$LOG_DIR/$b.log" 2>&1 || { tail -30 "$LOG_DIR/$b.log"; fail "$b" "$LOG_DIR/$b.log"; }
  tail -20 "$LOG_DIR/$b.log"
done
if [ -n "${OUT:-}" ]; then cp benchmarks/results/tt_*.* benchmarks/results/svd_*.* "$OUT"/ 2>/dev/null || true; fi

echo
echo "gpu_check: all stages passed; results in benchmarks/results/ (logs: $LOG_DIR)"
