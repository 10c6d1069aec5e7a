"""benchmarks/rank_selection.py: the synthetic grid's trial log resumes and shards correctly (the
full grid runs over several sessions and processes; its figures are in
benchmarks/results/rank_selection_full.md)."""

import json
import re

import pytest

from _util import import_benchmark


@pytest.fixture(scope="module")
def rank_selection():
    return import_benchmark("rank_selection")


def _log_keys(rs, path):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [rs.trial_key(r) for r in rows]


def test_shards_split_the_grid_and_resume_from_the_log(rank_selection, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")  # the run writes its plot (scripts/setup.sh test installs it)
    rs = rank_selection
    log = tmp_path / "trials.jsonl"
    grid = [c[0] for c in rs.synthetic_cells(True, False, seeds_override=3)]
    assert len(grid) == 3

    first = rs.run_synthetic(True, False, print, seeds_override=3, trial_log=log, shard=(1, 2))
    ran = _log_keys(rs, log)
    assert len(ran) == 1 and len(first) == 1  # shard 1/2 of 3 seed-major trials: the second
    assert ran[0] == sorted(grid, key=lambda k: k[-1])[1]

    second = rs.run_synthetic(True, False, print, seeds_override=3, trial_log=log, shard=(0, 2))
    keys = _log_keys(rs, log)
    assert len(keys) == len(set(keys)) == 3  # no trial twice, none missing
    assert sorted(rs.trial_key(t) for t in second) == sorted(grid)
    assert [rs.trial_key(t) for t in second] == grid  # reported in grid order

    again = rs.run_synthetic(True, False, print, seeds_override=3, trial_log=log)
    assert len(_log_keys(rs, log)) == 3  # everything was logged: nothing reruns
    assert [t["picks"] for t in again] == [t["picks"] for t in second]
    # every reported trial knows where it stands in the log (the order the trials ran in)
    order = {rs.trial_key(t): t["log_line"] for t in again}
    assert [order[k] for k in keys] == [0, 1, 2]

    # --max-minutes 0 runs nothing and reports what the log holds; trials logged after the
    # default rule was chosen get their own section
    monkeypatch.setattr(rs, "RULE_CHOSEN_BEFORE_LINE", 1)
    import torch

    threads = torch.get_num_threads()
    try:
        assert (
            rs.main(
                [
                    "--quick",
                    "--seeds",
                    "3",
                    "--parts",
                    "synthetic",
                    "--trial-log",
                    str(log),
                    "--max-minutes",
                    "0",
                    "--out",
                    str(tmp_path),
                    "--stem",
                    "report",
                    "--threads",
                    "1",
                ]
            )
            == 0
        )
    finally:
        torch.set_num_threads(threads)
    assert len(_log_keys(rs, log)) == 3
    report = json.loads((tmp_path / "report.json").read_text())
    assert len(report["synthetic"]) == 3 and report["meta"]["run"]["seeds"] == 3
    md = (tmp_path / "report.md").read_text()
    assert "--quick, 3 seeds per synthetic setting" in md
    assert "## Held out: the 2 trials logged after analytic_cv was chosen (log lines from 2 on" in md


@pytest.mark.parametrize("text", ["2/2", "1", "a/b", "0/0", "-1/2"])
def test_bad_shard_is_rejected(rank_selection, text):
    with pytest.raises(SystemExit):
        rank_selection.main(["--shard", text, "--parts", "synthetic", "--quick"])


def test_shard_needs_a_trial_log(rank_selection, capsys):
    with pytest.raises(SystemExit):
        rank_selection.main(["--shard", "1/2", "--parts", "synthetic", "--quick"])
    assert "--trial-log" in capsys.readouterr().err


def test_derived_picks_for_logged_trials(rank_selection):
    rows = [
        {"n": 100, "df_eff": [10.0, 20.0, 90.0], "est_by_rank": [1.0, 0.95, 0.94], "picks": {"test_error": 3}},
        {"n": 10_000, "df_eff": [10.0, 20.0, 90.0], "est_by_rank": [1.0, 0.95, 0.94], "picks": {"test_error": 3}},
        {"n": 100, "df_eff": [10.0], "picks": {"test_error": 1}},  # logged before est_by_rank
        {"n": 100, "df_eff": [10.0, 20.0], "est_by_rank": [1.0, None], "picks": {"test_error_1se": 2}},
    ]
    rank_selection.add_derived_picks(rows)
    assert [r["picks"].get("test_error_1se") for r in rows] == [1, 2, None, 2]  # the last one is kept
    assert all("analytic_cv" not in r["picks"] for r in rows)  # no train_error_by_rank
    rows = [{"n": 62, "df_eff": [61.0, 78.0], "est_by_rank": [None, None], "picks": {}}]  # no finite estimate
    rank_selection.add_derived_picks(rows)
    assert rows[0]["picks"]["test_error_1se"] == 1
    # analytic_cv: sigma2 (m - 1)/(m - df - 1), m = 0.8 n = 80; train errors 1.0, 0.78, 0.8 at df 10, 20, 40:
    # 1.0*100/90*79/69 = 1.272, 0.78*100/80*79/59 = 1.306, 0.8*100/60*79/39 = 2.701 -> rank 1, while the
    # full-sample estimates sigma2 (n - 1)/(n - df - 1) are 1.236, 1.222, 2.237 -> rank 2
    row = {"n": 100, "df_eff": [10.0, 20.0, 40.0], "train_error_by_rank": [1.0, 0.78, 0.8], "picks": {}}
    rank_selection.add_derived_picks([row])
    assert row["picks"]["analytic_cv"] == 1
    row = {"n": 1000, "df_eff": [10.0, 20.0, 40.0], "train_error_by_rank": [1.0, 0.9, 0.8], "picks": {}}
    rank_selection.add_derived_picks([row])
    assert row["picks"]["analytic_cv"] == 3
    row = {"n": 50, "df_eff": [39.0, 45.0], "train_error_by_rank": [1.0, 0.5], "picks": {}}  # m = 40: none finite
    rank_selection.add_derived_picks([row])
    assert row["picks"]["analytic_cv"] == 1


def test_default_rule_rows_render_on_the_trials_that_log_it(rank_selection):
    rs = rank_selection

    def trial(mult, picks, cv10_s=None):
        return {
            "mult": mult,
            "true_rank": 2,
            "noise_var": 1.0,
            "excess_by_rank": [0.5, 0.1, 0.3],
            "picks": dict(picks, oracle=2),
            "fit_s": 1.0,
            "cv5_s": 4.0,
            "cv10_s": cv10_s,
        }

    syn = [
        trial(2, {"test_error": 3, "test_error_1se": 2, "analytic_cv": 1, "cv5": 2}, cv10_s=9.0),
        trial(5, {"test_error": 2, "test_error_1se": 1, "analytic_cv": 2, "cv5": 1}),
        trial(5, {"test_error": 2, "cv5": 2}),
    ]  # logged before the rules existed
    (row,) = rs._default_rule_row(syn)
    assert "the default rule analytic_cv (2 trials that log" in row
    assert "| 50% | 50% | 0% | 4.00x" in row and "9.00x (1 trials)" in row
    (row,) = rs._default_rule_row(syn, "test_error_1se")
    assert "| synthetic, test_error_1se (2 trials" in row and "| 50% | 50% | 100% | 4.00x" in row
    table = "\n".join(rs._paired_comparison(syn))
    assert "| all | 2 | test_error_1se | 50% | 100% | 50% | 18.2% |" in table  # (0 + 1.5/1.1 - 1) / 2
    assert "| all | 2 | test_error | 50% | 0% | 50% | 9.1% |" in table
    assert "| all | 2 | analytic_cv | 50% | 0% | 50% | 18.2% |" in table
    assert rs._default_rule_row(syn[2:]) == [] and rs._paired_comparison(syn[2:]) == []


def test_a_trial_without_finite_estimates_is_logged_not_fatal(rank_selection, tmp_path):
    # cp 16x16, true rank 1, n = 2 df, SNR 0.5, seed 6 of the full grid: the rank-1 fit is degenerate
    # (Stein df 61 of n = 62) and no candidate has a finite estimated test error; it killed a shard
    rs = rank_selection
    log = tmp_path / "trials.jsonl"
    trials = rs.run_synthetic(
        False,
        True,
        lambda m: None,
        trial_log=log,
        deadline=float("inf"),
        shard=(0, 1),
        only=[("cp", (16, 16), 1, 2.0, 0.5, 6)],
    )
    (t,) = trials
    assert all(v is None for v in t["est_by_rank"])
    assert t["picks"]["test_error"] == t["picks"]["test_error_1se"] == 1
    assert json.loads(log.read_text())["seed"] == 6


def test_rewrite_renders_results_from_before_analytic_cv(rank_selection, tmp_path):
    pytest.importorskip("matplotlib")  # the run writes its plot (scripts/setup.sh test installs it)
    # the committed default-run results predate the analytic_cv pick: its cells read "-", not 0% / "no"
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "rank_selection.json"
    data = json.loads(src.read_text())
    for part in ("layer", "image"):
        for t in data.get(part) or []:
            t["picks"].pop("analytic_cv", None)
    for t in (data.get("minilm") or {}).get("layers", []):
        t["picks"].pop("analytic_cv", None)
    (data.get("mnist") or {}).get("picks", {}).pop("analytic_cv", None)
    path = tmp_path / "old.json"
    path.write_text(json.dumps(data))
    assert rank_selection.main(["--rewrite", str(path)]) == 0
    text = (tmp_path / "old.md").read_text()
    assert re.search(
        r"\| MNIST CNN Linear 3136->128 \| \(no true rank\) \| - \| test_error (yes|no), analytic_cv - \|", text
    )
    assert "analytic_cv 0%" not in text
    assert json.loads(path.read_text())["summary"]["minilm"]["agree_cv5_analytic_cv"] is None
