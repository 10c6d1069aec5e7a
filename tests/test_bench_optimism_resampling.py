"""benchmarks/optimism_resampling.py: its smoke run writes a consistent report (the figures of
the full run are in benchmarks/results/optimism_resampling.md)."""

import json

import pytest

from _util import import_benchmark


@pytest.fixture(scope="module")
def bench():
    return import_benchmark("optimism_resampling")


def test_quick_run_writes_json_markdown_and_plot(bench, tmp_path):
    pytest.importorskip("matplotlib")  # the run writes its plot (scripts/setup.sh test installs it)
    assert bench.main(["--quick", "--threads", "1", "--n-boot", "8", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "optimism_resampling_quick.json").read_text())
    (t,) = data["trials"]
    assert t["candidates"] == [1, 2, 3, 4] and t["n_boot"] == 8
    assert len(t["df_stein"]) == len(t["df_boot"]) == 4
    at = t["candidates"].index(t["true_rank"])
    # at the true rank of an easy problem both effective dfs are near the manifold df
    assert abs(t["df_boot"][at] - t["df"][at]) < 0.25 * t["df"][at]
    assert abs(t["df_stein"][at] - t["df"][at]) < 0.1 * t["df"][at]
    assert t["picks"]["stein"] == t["picks"]["bootstrap"] == t["true_rank"]
    s = data["summary"]
    assert s["trials"] == 1 and s["cells"]["at"] == 1
    md = (tmp_path / "optimism_resampling_quick.md").read_text()
    assert "| Stein df (the default) | 100% | 100% |" in md and "(true)" in md
    assert (tmp_path / "optimism_resampling_quick_df.png").stat().st_size > 1000


def test_summary_sorts_candidates_by_their_place_against_the_true_rank(bench):
    trial = {
        "candidates": [1, 2, 3],
        "true_rank": 2,
        "n": 100,
        "df": [9, 18, 25],
        "df_stein": [10.0, 20.0, 45.0],
        "df_boot": [10.0, 25.0, 30.0],
        "picks": {"stein": 2, "bootstrap": 3, "cv5": 2, "oracle": 2},
        "time_s": {"fit": 1.0, "stein": 1.0, "bootstrap": 10.0, "cv5": 8.0},
    }
    s = bench.summarize([trial])
    assert s["median_rel_df_diff"] == {"below": 0.0, "at": pytest.approx(0.2), "above": pytest.approx(0.5)}
    assert s["agree_stein_bootstrap"] == 0.0 and s["agree_stein_cv5"] == 1.0
    assert s["time_ratio_bootstrap_vs_rule"] == 5.0 and s["time_ratio_cv5_vs_rule"] == 4.0


def test_rewrite_regenerates_the_report_from_the_json(bench, tmp_path):
    pytest.importorskip("matplotlib")  # the run writes its plot (scripts/setup.sh test installs it)
    assert bench.main(["--quick", "--threads", "1", "--n-boot", "4", "--out", str(tmp_path)]) == 0
    js = tmp_path / "optimism_resampling_quick.json"
    md = tmp_path / "optimism_resampling_quick.md"
    md.write_text("stale")
    assert bench.main(["--rewrite", str(js)]) == 0
    assert md.read_text().startswith("# Optimism: Stein's closed-form df")
