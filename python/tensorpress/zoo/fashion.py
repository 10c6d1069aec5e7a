"""A Fashion-MNIST CNN of our own: trained once on first use (a few minutes on CPU), then cached.

The architecture is the MNIST CNN's (two 3x3 convs 1 -> 32 -> 64 with max-pooling, then
3136 -> 128 -> 10), trained with Adam from a fixed seed on the 60,000 training images; the
weights are cached under tensorpress.zoo.mnist.cache_dir() as ``fashion_cnn_v1.pt``.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from tensorpress._validate import is_int
from tensorpress.zoo.mnist import accuracy, cache_dir, fashion_mnist

CACHE_NAME = "fashion_cnn_v1.pt"
EPOCHS = 3
BATCH = 128
SEED = 0


class FashionCNN(nn.Module):
    """(N, 1, 28, 28) normalized images -> (N, 10) logits."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def train_fashion_cnn(epochs: int = EPOCHS, progress: bool = True, n_train: int | None = None) -> FashionCNN:
    """Train the CNN on the Fashion-MNIST training split (Adam, lr 1e-3, batch 128); ``n_train``
    uses only the first that many training images (for quick checks)."""
    if not is_int(epochs) or epochs < 1:
        raise ValueError(f"epochs: expected an int >= 1, got {epochs!r}")
    if n_train is not None and (not is_int(n_train) or n_train < 1):
        raise ValueError(f"n_train: expected None or an int >= 1, got {n_train!r}")
    images, labels = fashion_mnist("train")
    images, labels = images[:n_train], labels[:n_train]
    gen = torch.Generator().manual_seed(SEED)
    torch.manual_seed(SEED)
    model = FashionCNN()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    steps = epochs * ((len(images) + BATCH - 1) // BATCH)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="training the Fashion-MNIST CNN (once; cached)", file=sys.stderr)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(images), generator=gen).split(BATCH):
            loss = nn.functional.cross_entropy(model(images[idx]), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"loss {loss.item():.3f}")
    if bar is not None:
        bar.close()
    return model.eval()


def load_fashion_cnn(progress: bool = True) -> FashionCNN:
    """The trained CNN in eval mode: from the cache, or trained now and cached."""
    path = cache_dir() / CACHE_NAME
    model = FashionCNN()
    if path.is_file():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval()
    model = train_fashion_cnn(progress=progress)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)  # atomic: a concurrent reader never sees half a file
    return model


__all__ = ["FashionCNN", "accuracy", "load_fashion_cnn", "train_fashion_cnn"]
