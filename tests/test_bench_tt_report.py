"""benchmarks/bench_tt.py --rewrite: the report is regenerated from a results JSON, and its
"what the failed targets need" section is computed from the recorded plans and times."""

import json
import shutil
from pathlib import Path

import pytest

from _util import import_benchmark

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
# recorded with OpenBLAS's AVX2 kernels: the plans the tests' cost model chooses (conftest.py)
RECORDED = BENCH / "results" / "tt_cpu_haswell.json"


@pytest.fixture(scope="module")
def bench_tt():
    return import_benchmark("bench_tt")


def test_rewrite_adds_the_needed_rates(bench_tt, tmp_path):
    path = tmp_path / "tt_cpu.json"
    shutil.copy(RECORDED, path)
    assert bench_tt.main(["--rewrite", str(path)]) == 0
    md = path.with_suffix(".md").read_text()
    results = json.loads(path.read_text())["results"]
    rows = [
        line.split(" | ")
        for line in md.splitlines()
        if line.startswith("| ") and line.count("|") == 8 and (" | fwd | " in line or " | f+b | " in line)
    ]
    failed = [
        (r, key)
        for r in results
        for key, target in (("fwd_ms", bench_tt.TARGET_FWD), ("fwd_bwd_ms", bench_tt.TARGET_FB))
        if r["speedup_vs_peer"][key] < target
    ]
    assert len(rows) == len(failed) > 0
    for (r, key), row in zip(failed, rows):
        executed, allowed, needed = float(row[2]) * 1e6, float(row[3]), float(row[4])
        peer_ms = r["times_ms"][r["fastest_peer"][key]][key]
        assert allowed == pytest.approx(peer_ms / (2.0 if key == "fwd_ms" else 1.5), abs=1e-3)
        assert needed == pytest.approx(executed / (allowed * 1e6), rel=1e-3)
        if key == "fwd_ms":
            assert executed == pytest.approx(r["plan_flops"], rel=1e-3)
        elif not r["plan"].startswith("dense"):  # fused: 3x forward + the recompute, more than 3x
            assert 3 * r["plan_flops"] < executed < 4 * r["plan_flops"]


def test_executed_flops_of_a_two_step_plan(bench_tt):
    """(4,8,8,4) cores merged two by two: two equal steps, so the backward recomputes half the forward."""
    r = {
        "in_features": 1024,
        "out_features": 1024,
        "ranks": [8, 8, 8],
        "in_factors": [4, 8, 8, 4],
        "out_factors": [4, 8, 8, 4],
        "batch": 256,
        "case": "c",
    }
    from tensorpress.nn import TTLinear

    plan = TTLinear(1024, 1024, 8, in_factors=(4, 8, 8, 4), out_factors=(4, 8, 8, 4)).plan(256)
    r["plan"] = str(plan)
    assert not plan.dense and len(plan.groups) == 2, plan  # the recorded benchmark's plan
    assert bench_tt.executed_fwd_bwd_flops(r) == pytest.approx(3.5 * plan.flops, rel=0.05)
    with pytest.raises(ValueError, match="recorded"):
        bench_tt.executed_fwd_bwd_flops({**r, "plan": "something else"})
