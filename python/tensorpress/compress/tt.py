r"""Data-aware TT-matrix fits of a linear layer: ALS sweeps over the cores.

The objective is that of the low-rank fits (see :mod:`tensorpress.compress.lowrank`), with W^
constrained to a TT-matrix of given bond ranks instead of a rank:

    min over cores and free b^ of || X W^T + 1 b^T - X~ W^^T - 1 b^^T ||_F^2
      = tr(W^ G W^^T) - 2 tr(W^ Q) + const,   G = X~c^T X~c (+ ridge),  Q = X~c^T Xc W^T,

with centered X, X~ (the free bias absorbs the means: b^ = b + W mu - W^ mu~).

W^ is linear in each core: W^ = P_k(G_k), with P_k built from the product of the cores left
and right of k (its "interfaces"). Keeping the left interface left-orthonormal and the right one
right-orthonormal (QR moves between cores, as in TT rounding) makes P_k an isometry, so the
core update, the least-squares problem

    P_k^* (P_k(G_k) G) = P_k^*(Q^T),

is as well conditioned as G itself. Its normal matrix has (r_{k-1} n_k r_k)^2 entries (10^8
and more for the middle cores of a transformer layer), so it is solved matrix-free by
conjugate gradients from the current core: each product costs one dense W^ G (out * in^2)
plus two interface contractions (out * in * r). CG started from the current core decreases
the quadratic at every step, so every sweep lowers the objective even when a core's solve is
cut off by the iteration cap. The sweeps start from the TT-SVD of the weight (the ``svd``
structure's answer), so the data-aware fit is never worse than it on the calibration rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from tensorpress._validate import is_int
from tensorpress.compress.lowrank import DEFAULT_RIDGE, small_problem_threads
from tensorpress.compress.quadratic import OutputObjective, conjugate_gradient
from tensorpress.compress.stats import GramStats
from tensorpress.decompose.tt import tt_matrix_svd
from tensorpress.tt_format import (
    balanced_factors,
    capped_ranks,
    cores_to_dense,
    default_num_factors,
    max_bond_ranks,
    tt_params,
)

DEFAULT_SWEEPS = 2
DEFAULT_CG_ITERS = 25


@dataclass
class TTFit:
    """W^ as TT-matrix cores (r_{k-1}, m_k, n_k, r_k) (float64), the bias (out,) or None, and
    diagnostics in ``info`` (method, objective after each core update, ...)."""

    cores: list[Tensor]
    out_factors: tuple[int, ...]
    in_factors: tuple[int, ...]
    bias: Tensor | None
    info: dict = field(default_factory=dict)

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(int(g.shape[3]) for g in self.cores[:-1])

    @property
    def rank(self) -> int:
        """The largest bond rank."""
        return max(self.ranks, default=1)

    def weight(self) -> Tensor:
        """The dense (out, in) weight."""
        out = math.prod(self.out_factors)
        return cores_to_dense(self.cores).reshape(out, -1)


def tt_factors(layer: nn.Linear, num_factors: int | None = None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(in_factors, out_factors): balanced splits of the layer's sides (TTLinear's defaults)."""
    d = num_factors or default_num_factors(layer.in_features, layer.out_features)
    return (
        balanced_factors(layer.in_features, d, "in_features"),
        balanced_factors(layer.out_features, d, "out_features"),
    )


def uniform_tt_rank(layer: nn.Linear, budget: float, out_factors, in_factors) -> int:
    """The largest uniform bond rank whose cores + bias fit in budget * (dense weights + bias)."""
    allowed = budget * (layer.in_features * layer.out_features + layer.out_features) - layer.out_features
    top = max(max_bond_ranks(out_factors, in_factors), default=1)
    best = 1
    for r in range(1, top + 1):
        if tt_params(out_factors, in_factors, capped_ranks(r, out_factors, in_factors)) > allowed:
            break
        best = r
    return best


# ---------------------------------------------------------------------------- TT algebra
def _extend_left(left: Tensor, core: Tensor) -> Tensor:
    """left (M<, N<, a) x core (a, m, n, b) -> (M< m, N< n, b)."""
    x, y, a = left.shape
    _, m, n, b = core.shape
    t = (left.reshape(x * y, a) @ core.reshape(a, m * n * b)).reshape(x, y, m, n, b)
    return t.permute(0, 2, 1, 3, 4).reshape(x * m, y * n, b)


def _extend_right(core: Tensor, right: Tensor) -> Tensor:
    """core (a, m, n, b) x right (b, M>, N>) -> (a, m M>, n N>)."""
    a, m, n, b = core.shape
    _, z, w = right.shape
    t = (core.reshape(a * m * n, b) @ right.reshape(b, z * w)).reshape(a, m, n, z, w)
    return t.permute(0, 1, 3, 2, 4).reshape(a, m * z, n * w)


class _CoreMap:
    """The linear map core k -> W^ (out, in) for fixed interfaces, and its adjoint."""

    def __init__(self, left: Tensor, right: Tensor, m: int, n: int):
        self.left, self.right, self.m, self.n = left, right, m, n
        self.x, self.y, self.a = left.shape
        self.b, self.z, self.w = right.shape

    def apply(self, g: Tensor) -> Tensor:
        x, y, a, b, z, w, m, n = self.x, self.y, self.a, self.b, self.z, self.w, self.m, self.n
        t = self.left.reshape(x * y, a) @ g.reshape(a, m * n * b)  # (x y, m n b)
        t = t.reshape(x * y * m * n, b) @ self.right.reshape(b, z * w)  # (x y m n, z w)
        t = t.reshape(x, y, m, n, z, w).permute(0, 2, 4, 1, 3, 5)
        return t.reshape(x * m * z, y * n * w)

    def adjoint(self, mat: Tensor) -> Tensor:
        x, y, a, b, z, w, m, n = self.x, self.y, self.a, self.b, self.z, self.w, self.m, self.n
        t = mat.reshape(x, m, z, y, n, w).permute(0, 3, 1, 4, 2, 5).reshape(x * y * m * n, z * w)
        t = t @ self.right.reshape(b, z * w).T  # (x y m n, b)
        t = self.left.reshape(x * y, a).T @ t.reshape(x * y, m * n * b)  # (a, m n b)
        return t.reshape(a, m, n, b)


def _left_orthonormalize(cores: list[Tensor], k: int) -> None:
    """QR core k as a (r_{k-1} m n, r_k) matrix; R moves into core k + 1."""
    a, m, n, b = cores[k].shape
    q, r = torch.linalg.qr(cores[k].reshape(a * m * n, b))
    cores[k] = q.reshape(a, m, n, q.shape[1])
    nxt = cores[k + 1]
    cores[k + 1] = (r @ nxt.reshape(nxt.shape[0], -1)).reshape(r.shape[0], *nxt.shape[1:])


def _right_orthonormalize(cores: list[Tensor], k: int) -> None:
    """LQ core k as a (r_{k-1}, m n r_k) matrix; L moves into core k - 1."""
    a, m, n, b = cores[k].shape
    q, r = torch.linalg.qr(cores[k].reshape(a, m * n * b).T)
    cores[k] = q.T.reshape(q.shape[1], m, n, b)
    prev = cores[k - 1]
    cores[k - 1] = (prev.reshape(-1, prev.shape[3]) @ r.T).reshape(*prev.shape[:3], r.shape[0])


# ---------------------------------------------------------------------------- fits
def _check(weight: Tensor, out_factors, in_factors, ranks) -> tuple[int, ...]:
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(f"weight: expected a 2-D tensor (out, in), got {getattr(weight, 'shape', weight)!r}")
    if len(out_factors) != len(in_factors) or len(out_factors) < 2:
        raise ValueError(
            f"out_factors, in_factors: expected two lists of the same length >= 2, got {out_factors} and {in_factors}"
        )
    if math.prod(out_factors) != weight.shape[0] or math.prod(in_factors) != weight.shape[1]:
        raise ValueError(
            f"out_factors, in_factors: expected products {tuple(weight.shape)}, got "
            f"{math.prod(out_factors)} and {math.prod(in_factors)}"
        )
    d = len(out_factors)
    values = [ranks] * (d - 1) if isinstance(ranks, int) else list(ranks)
    if len(values) != d - 1 or any(not is_int(r) or r < 1 for r in values):
        raise ValueError(f"ranks: expected an int >= 1 or {d - 1} of them, got {ranks!r}")
    return tuple(min(r, c) for r, c in zip(values, max_bond_ranks(out_factors, in_factors)))


def fit_tt_svd(weight: Tensor, bias: Tensor | None, ranks, out_factors, in_factors) -> TTFit:
    """The TT-SVD of the weight alone (no data)."""
    caps = _check(weight, out_factors, in_factors, ranks)
    w = weight.detach().to(torch.float64)
    with small_problem_threads(w.device, min(w.shape)):
        res = tt_matrix_svd(w, out_factors, in_factors, max_rank=list(caps))
    b = None if bias is None else bias.detach().to(torch.float64).clone()
    return TTFit(list(res.cores), tuple(out_factors), tuple(in_factors), b, {"method": "svd"})


def fit_tt_activation(
    weight: Tensor,
    bias: Tensor | None,
    stats: GramStats,
    ranks,
    out_factors,
    in_factors,
    sweeps: int = DEFAULT_SWEEPS,
    cg_iters: int = DEFAULT_CG_ITERS,
    ridge: float = DEFAULT_RIDGE,
) -> TTFit:
    """The data-aware TT fit of the module docstring: TT-SVD, then ``sweeps`` ALS sweeps
    (each a left-to-right and a right-to-left pass over the cores). With one-shot statistics
    (X~ = X) it is the "whitened" method's TT counterpart."""
    caps = _check(weight, out_factors, in_factors, ranks)
    if stats.in_features != weight.shape[1]:
        raise ValueError(f"stats: expected statistics of {weight.shape[1]} input features, got {stats.in_features}")
    for name, v in (("sweeps", sweeps), ("cg_iters", cg_iters)):
        if not is_int(v) or v < 0:
            raise ValueError(f"{name}: expected an int >= 0, got {v!r}")
    w = weight.detach().to(torch.float64)
    start = fit_tt_svd(weight, None, list(caps), out_factors, in_factors)
    cores = list(start.cores)
    objective = OutputObjective(w, stats, ridge)  # the squared centered output error
    gram = objective.gram
    if gram is None:  # the memory plan gives Kronecker-factored statistics to convs only
        raise ValueError("stats: a TT fit needs the exact input Gram, got Kronecker-factored statistics")
    history = [objective(cores_to_dense(cores).reshape(w.shape))]
    d = len(cores)
    # the CG products (out x in by in x in) run on every thread; the small QRs of the cores on one
    # (see small_problem_threads)
    with small_problem_threads(w.device, min(w.shape)):
        for k in range(d - 1, 0, -1):  # right-orthonormal cores 1..d-1, the free one is core 0
            _right_orthonormalize(cores, k)
    order = list(range(d)) + list(range(d - 2, -1, -1))  # there and back
    for _ in range(sweeps):
        for step, k in enumerate(order):
            going_right = step < d - 1
            _update_core(cores, k, gram, objective.target, cg_iters)
            history.append(objective(cores_to_dense(cores).reshape(w.shape)))
            with small_problem_threads(w.device, min(w.shape)):
                if going_right and k < d - 1:
                    _left_orthonormalize(cores, k)
                elif not going_right and k > 0:
                    _right_orthonormalize(cores, k)
    fit = TTFit(
        cores,
        tuple(out_factors),
        tuple(in_factors),
        None,
        {
            "method": "activation" if stats.paired else "whitened",
            "objective": history,
            "output_energy": objective.energy,
        },
    )
    # the free bias b^ = b + W mu - W^ mu~
    b = w @ stats.mean_ref - fit.weight() @ stats.mean_in
    fit.bias = b if bias is None else b + bias.detach().to(torch.float64)
    return fit


def _update_core(cores: list[Tensor], k: int, gram: Tensor, target: Tensor, cg_iters: int) -> None:
    """Core k <- the least-squares solution (CG from the current core) for fixed interfaces."""
    one = torch.ones(1, 1, 1, dtype=gram.dtype, device=gram.device)
    left, right = one, one
    for g in cores[:k]:
        left = _extend_left(left, g)
    for g in reversed(cores[k + 1 :]):
        right = _extend_right(g, right)
    _, m, n, _ = cores[k].shape
    cmap = _CoreMap(left, right, m, n)
    rhs = cmap.adjoint(target)
    cores[k] = conjugate_gradient(lambda g: cmap.adjoint(cmap.apply(g) @ gram), rhs, cores[k], cg_iters)
