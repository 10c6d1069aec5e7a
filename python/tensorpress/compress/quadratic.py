r"""The data-aware objective of the structured fits (TT, Tucker-2, CP) and the solver of their
block updates.

For a layer with weight W, the squared centered output error of a replacement W^ on the
calibration rows is, from the Gram matrices,

    E(W^) = tr(W Cr W^T) + tr(W^ G W^^T) - 2 tr(W^ T^T),   G = X~c^T X~c (+ ridge),  T = W C^T,

with Cr = Xc^T Xc and C = X~c^T Xc. A structured W^ is linear in each of its blocks, so every
block update is a symmetric positive (semi)definite linear system, solved by conjugate
gradients from the current block.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tensorpress.compress.stats import GramStats


def _ridge(cov: Tensor, ridge: float) -> float:
    """The absolute ridge: ``ridge`` times the mean diagonal of cov (``ridge`` itself when cov is 0)."""
    scale = float(cov.diagonal().mean())
    return ridge * scale if scale > 0 else ridge


def ridged_gram(cov: Tensor, ridge: float) -> Tensor:
    """cov + ridge * mean(diag(cov)) I: keeps directions with (almost) no energy well posed."""
    out = cov.clone()
    out.diagonal().add_(_ridge(cov, ridge))
    return out


def ridged_cholesky(cov: Tensor, ridge: float) -> tuple[Tensor, float]:
    """(L, delta): the lower Cholesky factor of cov + delta I, delta = ridge * mean(diag(cov))
    raised tenfold until the factorization succeeds (a Gram matrix that rounding made slightly
    indefinite). The one ridge policy of every data-aware fit."""
    delta = _ridge(cov, ridge)
    eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    for _ in range(12):
        L, bad = torch.linalg.cholesky_ex(cov + delta * eye)
        if int(bad) == 0:
            return L, delta
        delta *= 10.0
    raise ValueError(
        "calib: the calibration inputs' Gram matrix is not positive semidefinite even after a large "
        f"ridge (delta = {delta:.3g}); the calibration statistics are inconsistent (NaN or overflow?)"
    )


class OutputObjective:
    """E(W^) of the module docstring for one layer: ``gram`` (G, or None when the statistics
    keep X~^T X~ only as an operator: Kronecker-factored), ``apply(V)`` (V G), ``target`` (T,
    out x in), ``energy`` (the original outputs' centered energy, E(0)); calling it on W^ gives
    E(W^)."""

    def __init__(self, weight: Tensor, stats: GramStats, ridge: float) -> None:
        w = weight.detach().to(torch.float64)
        self.stats = stats
        self.gram: Tensor | None
        if stats.kronecker is None:
            gram = stats.cov_in.to(w.device)  # a fresh matrix: ridged in place
            gram.diagonal().add_(_ridge(gram, ridge))
            self.gram, self.delta = gram, 0.0
        else:
            scale = stats.in_mean_diag()
            self.gram, self.delta = None, (ridge * scale if scale > 0 else ridge)
        self.target = stats.cov_cross_times(w).T
        self.energy = stats.ref_energy(w) + stats.energy_offset(w)

    def apply(self, v: Tensor) -> Tensor:
        """V G for V (m, in)."""
        if self.gram is not None:
            return v @ self.gram
        return self.stats.in_apply(v).to(v.device) + self.delta * v

    def __call__(self, w_hat: Tensor) -> float:
        return self.energy + (self.apply(w_hat) * w_hat).sum().item() - 2 * (w_hat * self.target).sum().item()


def conjugate_gradient(matvec, rhs: Tensor, start: Tensor, iters: int, tol: float = 1e-10) -> Tensor:
    """CG for the SPD system matvec(g) = rhs from `start`; each step lowers the quadratic."""
    g = start.clone()
    r = rhs - matvec(g)
    p = r.clone()
    rr = (r * r).sum()
    stop = tol * tol * max((rhs * rhs).sum().item(), 1e-300)
    for _ in range(iters):
        if rr.item() <= stop:
            break
        ap = matvec(p)
        curvature = (p * ap).sum()
        if curvature.item() <= 0:
            break
        alpha = rr / curvature
        g += alpha * p
        r -= alpha * ap
        rr_new = (r * r).sum()
        p = r + (rr_new / rr) * p
        rr = rr_new
    return g
