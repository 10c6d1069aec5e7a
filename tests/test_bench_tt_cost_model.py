"""benchmarks/tt_cost_model.py: the weight fit, the plan it picks and the report rewrite."""

import json
import shutil
from pathlib import Path

import pytest

from _util import import_benchmark

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
RECORDED = BENCH / "results" / "tt_cost_model.json"
KNOWN = {"flops": 1.0, "traffic": 0.5, "copy": 10.0, "short_runs": 30.0, "transpose": 20.0}


@pytest.fixture(scope="module")
def tcm():
    return import_benchmark("tt_cost_model")


def synthetic_case(tcm, name, n_plans, seed, dense_rate):
    """Plans whose forward time is exactly KNOWN . features (1 ns per FLOP-equivalent), and a
    dense route running at `dense_rate` times that rate per FLOP."""
    import random

    rnd = random.Random(seed)
    plans = []
    for i in range(n_plans):
        f = {k: rnd.uniform(1e5, 1e7) for k in tcm.FEATURES}
        ms = tcm.model_cost(f, KNOWN) * 1e-6
        plans.append(
            {
                "plan": f"{name} plan {i}",
                "dense": False,
                "merge_flops": 0,
                "features": f,
                "fwd_ms": ms,
                "fwd_bwd_ms": 3 * ms,
            }
        )
    flops = 2e7
    dense = {
        "plan": f"{name} dense",
        "dense": True,
        "merge_flops": 0,
        "features": {"flops": flops},
        "fwd_ms": flops / dense_rate * 1e-6,
        "fwd_bwd_ms": 3 * flops / dense_rate * 1e-6,
    }
    return {"name": name, "plans": plans, "dense": dense}


def test_fit_recovers_the_weights_that_made_the_times(tcm):
    cases = [synthetic_case(tcm, f"c{i}", 12, i, dense_rate=1.5) for i in range(3)]
    w = tcm.fit_weights(cases)
    for k, v in KNOWN.items():
        assert w[k] == pytest.approx(v, rel=1e-6, abs=1e-6)
    assert w["dense_speed_advantage"] == pytest.approx(1.5, rel=1e-6)
    # with the true weights every pick is the fastest plan: no regret anywhere
    for verdict in tcm.judge(cases, w):
        assert verdict["fwd_regret"] == pytest.approx(0, abs=1e-9)
        assert verdict["spearman"] == pytest.approx(1.0)


def test_pick_charges_merging_and_gives_ties_to_the_dense_route(tcm):
    case = synthetic_case(tcm, "c", 4, 0, dense_rate=1.0)
    w = dict(KNOWN, dense_speed_advantage=1.0)
    cheapest = min(case["plans"], key=lambda r: tcm.model_cost(r["features"], w))
    case["dense"]["features"]["flops"] = tcm.model_cost(cheapest["features"], w)
    assert tcm.pick(case, w) is case["dense"]  # a tie goes to the dense route
    case["dense"]["features"]["flops"] += 1  # the dense route a hair dearer
    assert tcm.pick(case, w) is cheapest
    cheapest["merge_flops"] = 1e9  # merging it costs more than it saves
    assert tcm.pick(case, w) is not cheapest


def test_rewrite_judges_the_recorded_weights_again(tcm, tmp_path):
    pytest.importorskip("matplotlib")  # the run writes its plot (scripts/setup.sh test installs it)
    path = tmp_path / "tt_cost_model.json"
    shutil.copy(RECORDED, path)
    assert tcm.main(["--rewrite", str(path)]) == 0
    data = json.loads(path.read_text())
    assert set(data["verdicts"]) == {"current", "refit", "refit, case left out"}
    assert len(data["verdicts"]["current"]) == len(data["cases"]) == len(tcm.CASES)
    for v in data["verdicts"]["current"]:
        assert v["fwd_regret"] >= 0 and v["fwd_bwd_regret"] >= 0
    md = path.with_suffix(".md").read_text()
    assert "Mean regret" in md and path.with_suffix(".png").exists()
