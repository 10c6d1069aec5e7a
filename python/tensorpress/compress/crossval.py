r"""K-fold cross-validated error curves of the layers' low-rank fits (rank_rule="cv").

The calibration batches are split into K folds (batch i of a process goes to fold i mod K) and
every layer's input statistics are kept per fold. For fold k the whitened/activation fit is
computed from the other folds' statistics and scored on fold k's rows, at every rank at once:

With one-shot statistics the rank-r fit is W^_r = P_r W, with P_r = V_r V_r^T the projection
onto the top-r right singular vectors of M = L^{-1} G W^T (G = L L^T the training folds'
centered Gram), and the free bias b^ = b + (I - P_r) W mu_train. On a held-out row x the output
error is (I - P_r) W (x - mu_train), so with A = W S W^T, S = sum over held-out rows of
(x - mu_train)(x - mu_train)^T:

    held-out error^2(r) = tr(A) - sum_{j <= r} v_j^T A v_j ,

one SVD and one (out x out) product per layer and fold. The curve is the summed held-out
error over the summed held-out output energy, the cross-validated counterpart of the
training curves of tensorpress.compress.allocate.relative_error_curves.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from tensorpress.compress.lowrank import DEFAULT_RIDGE, small_problem_threads, whitening_factor
from tensorpress.compress.stats import GramStats
from tensorpress.compress.structures import layer_bias, weight_matrix

DEFAULT_FOLDS = 5


def merge_stats(parts: Sequence[Mapping[str, GramStats]]) -> dict[str, GramStats]:
    """{layer: statistics of all the parts' rows}; layers that share an accumulator in the
    parts (q, k, v read the same input) share one in the result too."""
    merged: dict[str, GramStats] = {}
    by_source: dict[int, GramStats] = {}
    for name, first in parts[0].items():
        key = id(first)
        if key not in by_source:
            total = GramStats(first.in_features, paired=False)
            for part in parts:
                total.merge_(part[name])
            by_source[key] = total
        merged[name] = by_source[key]
    return merged


def heldout_error_curve(
    layer: nn.Module, train: GramStats, test: GramStats, ridge: float = DEFAULT_RIDGE
) -> tuple[Tensor, float]:
    """(squared output error on ``test``'s rows of the one-shot fit from ``train`` at ranks
    0..k, output energy of those rows)."""
    w = weight_matrix(layer).to(torch.float64)
    bias = layer_bias(layer)
    b = None if bias is None else bias.to(torch.float64)
    with small_problem_threads(w.device, min(w.shape)):
        L = whitening_factor(train.cov_in, ridge)
        M = torch.linalg.solve_triangular(L, train.cov_in @ w.T, upper=False)
        vh = torch.linalg.svd(M, full_matrices=False)[2]  # (k, out), rows v_j^T
        shift = test.mean_ref - train.mean_ref
        scatter = test.cov_ref + test.n * torch.outer(shift, shift)
        A = w @ scatter @ w.T
        captured = ((vh @ A) * vh).sum(1).cumsum(0)
        total = A.diagonal().sum()
        err = torch.cat([total.reshape(1), total - captured]).clamp_min(0)
    mean_out = w @ test.mean_ref + (0 if b is None else b)
    energy = (((w @ test.cov_ref) * w).sum() + test.n * mean_out.square().sum()).item()
    return err, energy


def cv_error_curves(
    layers: Mapping[str, nn.Module], folds: Sequence[Mapping[str, GramStats]], ridge: float = DEFAULT_RIDGE
) -> dict[str, Tensor]:
    """Cross-validated relative squared output error at ranks 0..k of every layer, from the
    per-fold one-shot statistics (see the module docstring)."""
    if len(folds) < 2:
        raise ValueError(f"folds: cross-validation needs at least 2 folds, got {len(folds)}")
    err = {name: torch.zeros((), dtype=torch.float64) for name in layers}  # the curves' sums over folds
    energy: dict[str, float] = {name: 0.0 for name in layers}
    for k, held_out in enumerate(folds):
        # one training set at a time: each is as large as all the statistics together
        train = merge_stats([f for j, f in enumerate(folds) if j != k])
        for name, layer in layers.items():
            e, en = heldout_error_curve(layer, train[name], held_out[name], ridge)
            err[name], energy[name] = err[name] + e, energy[name] + en
    return {name: err[name] / max(energy[name], 1e-300) for name in layers}
