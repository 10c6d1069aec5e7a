"""The gradient baseline: SGD/Adam training of the same network (e.g. TenBCD(...).to_torch() at init)."""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tensorpress._validate import is_int


def train_backprop(
    model: nn.Module,
    X: Tensor,
    y: Tensor,
    epochs: int = 10,
    optimizer: str = "adam",
    lr: float = 1e-3,
    batch_size: int = 128,
    momentum: float = 0.9,
    loss: str = "cross_entropy",
    X_test: Tensor | None = None,
    y_test: Tensor | None = None,
    seed: int = 0,
    verbose: bool = False,
    masks: dict[str, Tensor] | None = None,
) -> dict[str, list]:
    """Mini-batch training of `model` in place; returns the per-epoch history.

    X (n, d_0), y (n,) integer labels; loss "cross_entropy" or "mse" (on one-hot targets, like
    tenBCD's data term). History: epoch, loss (mean over the epoch), train_acc, test_acc,
    time_s (training time of the epoch, evaluation excluded).
    masks: {parameter name: 0/1 tensor of its shape}: those parameters are multiplied by their
    masks before training and after every step (a pruned network trained with its sparsity
    pattern fixed, as in magnitude pruning with fine-tuning).
    """
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer: expected 'adam' or 'sgd', got {optimizer!r}")
    if loss not in ("cross_entropy", "mse"):
        raise ValueError(f"loss: expected 'cross_entropy' or 'mse', got {loss!r}")
    if not isinstance(X, Tensor) or X.dim() != 2 or not isinstance(y, Tensor) or y.dim() != 1 or len(y) != len(X):
        raise ValueError(
            f"X, y: expected (n, d) and (n,) tensors, got {getattr(X, 'shape', None)} and {getattr(y, 'shape', None)}"
        )
    for name, v in (("epochs", epochs), ("batch_size", batch_size)):
        if not is_int(v) or v < (0 if name == "epochs" else 1):
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr: expected a positive float, got {lr!r}")
    p0 = next(model.parameters())
    X, y = X.to(p0.device, p0.dtype), y.to(p0.device).long()
    params = dict(model.named_parameters())
    masks = dict(masks or {})
    for name, m in masks.items():
        if name not in params or tuple(m.shape) != tuple(params[name].shape):
            raise ValueError(
                f"masks[{name!r}]: expected a parameter name of the model and its shape, got {tuple(m.shape)}"
            )
    masked = [(params[name], m.to(params[name].device, params[name].dtype)) for name, m in masks.items()]

    def apply_masks():
        with torch.no_grad():
            for p, m in masked:
                p.mul_(m)

    apply_masks()
    C = None
    opt = (
        torch.optim.Adam(model.parameters(), lr=lr)
        if optimizer == "adam"
        else torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    )
    gen = torch.Generator().manual_seed(seed)
    hist: dict[str, list] = {k: [] for k in ("epoch", "loss", "train_acc", "test_acc", "time_s")}
    n = len(X)
    for ep in range(1, epochs + 1):
        t0 = time.perf_counter()
        model.train()
        perm = torch.randperm(n, generator=gen).to(X.device)
        total = 0.0
        for s in range(0, n, batch_size):
            idx = perm[s : s + batch_size]
            out = model(X[idx])
            if loss == "cross_entropy":
                batch_loss = F.cross_entropy(out, y[idx])
            else:
                C = C or out.shape[1]
                batch_loss = 0.5 * (out - F.one_hot(y[idx], C).to(out.dtype)).square().sum(1).mean()
            opt.zero_grad(set_to_none=True)
            batch_loss.backward()
            opt.step()
            apply_masks()
            total += float(batch_loss.detach()) * len(idx)
        if X.device.type == "cuda":
            torch.cuda.synchronize(X.device)
        dt = time.perf_counter() - t0
        if not math.isfinite(total):
            raise FloatingPointError(f"train_backprop: loss became non-finite in epoch {ep} (lr={lr} too large?)")
        hist["epoch"].append(ep)
        hist["loss"].append(total / n)
        hist["time_s"].append(dt)
        hist["train_acc"].append(accuracy(model, X, y))
        hist["test_acc"].append(accuracy(model, X_test, y_test) if X_test is not None and y_test is not None else None)
        if verbose:
            print(
                f"{optimizer} ep {ep:3d} loss={total / n:.4f} train={hist['train_acc'][-1]:.4f} "
                f"test={hist['test_acc'][-1]} {dt:.2f}s",
                flush=True,
            )
    return hist


@torch.no_grad()
def accuracy(model: nn.Module, X: Tensor, y: Tensor, batch_size: int = 4096) -> float:
    """Fraction of rows of X whose argmax output equals y."""
    p0 = next(model.parameters())
    model.eval()
    X, y = X.to(p0.device, p0.dtype), y.to(p0.device)
    hits = sum(
        int((model(X[s : s + batch_size]).argmax(1) == y[s : s + batch_size]).sum())
        for s in range(0, len(X), batch_size)
    )
    return hits / len(X)
