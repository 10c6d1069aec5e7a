"""CP (CANDECOMP/PARAFAC) decompositions.

``cp_als``: alternating least squares with column normalization, a ridge-guarded normal
equation per mode and a stopping rule on the relative change of the fit.

``cp_overparam``: over-parameterized gradient descent after Wang, Wu, Lee, Ma & Ge, "Beyond
Lazy Training for Over-parameterized Tensor Decomposition" (NeurIPS 2020): fit m > rank
components from a small random start by gradient descent, re-randomize the components that
do not grow, keep the ``rank`` largest and polish them with ALS. ``lazy=True`` gives the
comparison variant (large start, no re-randomization).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from tensorpress._validate import check_int
from tensorpress.linalg import truncated_svd

INITS = ("svd", "random")


@dataclass
class CPResult:
    """T ~ sum_r weights[r] * factors[0][:, r] o factors[1][:, r] o ...

    factors[n] is (p_n, rank) with unit-norm columns (zero columns where a weight is 0),
    weights (rank,) sorted by decreasing magnitude. rel_error = ||T - T_hat|| / ||T||;
    history holds the relative error after each sweep (ALS) or at each check (gradient
    descent, then ALS); n_iter counts ALS sweeps (gradient steps are in ``n_steps``).
    """

    weights: Tensor
    factors: list[Tensor]
    rel_error: float
    n_iter: int
    history: list[float] = field(default_factory=list)
    converged: bool = False
    n_steps: int = 0
    n_reinit: int = 0
    time_s: float = 0.0

    @property
    def rank(self) -> int:
        return int(self.weights.shape[0])

    def to_tensor(self) -> Tensor:
        return cp_to_tensor(self.weights, self.factors)


def cp_to_tensor(weights: Tensor | None, factors: Sequence[Tensor]) -> Tensor:
    """sum_r weights[r] * factors[0][:, r] o ... o factors[d-1][:, r] (weights None: all ones)."""
    first = factors[0] if weights is None else factors[0] * weights
    shape = [f.shape[0] for f in factors]
    rank = first.shape[1]
    kr = _khatri_rao(factors[1:])  # (prod p_1.., rank)
    return (first @ kr.T).reshape(shape) if rank else first.new_zeros(shape)


# ---------------------------------------------------------------------------- helpers
def _khatri_rao(mats: Sequence[Tensor]) -> Tensor:
    """Column-wise Kronecker product, first matrix most significant (row-major unfolding)."""
    out = mats[0]
    for m in mats[1:]:
        out = (out[:, None, :] * m[None, :, :]).reshape(-1, out.shape[1])
    return out


def _unfold(t: Tensor, mode: int) -> Tensor:
    return torch.movedim(t, mode, 0).reshape(t.shape[mode], -1)


def _mttkrp(t: Tensor, factors: Sequence[Tensor], mode: int) -> Tensor:
    """Unfold(T, mode) @ KhatriRao(other factors): (p_mode, rank), without forming the
    Khatri-Rao product (for a conv kernel's 3x3 modes it would be a (p_out p_in 3) x rank matrix).

    One GEMM contracts the largest other mode and brings in the rank index; each remaining mode
    is then a multiply-and-sum over a tensor that already lost that largest mode.
    """
    others = [m for m in range(t.dim()) if m != mode]
    first = max(others, key=lambda m: t.shape[m])
    out = torch.tensordot(t, factors[first], dims=([first], [0]))  # axes: t's minus `first`, then rank
    axes = [m for m in range(t.dim()) if m != first]
    for m in others:
        if m == first:
            continue
        pos = axes.index(m)
        moved = torch.movedim(out, pos, -2)  # (..., p_m, rank)
        out = (moved * factors[m]).sum(-2)
        axes.pop(pos)
    return out  # only `mode` and the rank axis remain


def _hadamard_grams(factors: Sequence[Tensor], skip: int | None = None) -> Tensor:
    rank = factors[0].shape[1]
    v = torch.ones(rank, rank, dtype=factors[0].dtype, device=factors[0].device)
    for m, f in enumerate(factors):
        if m != skip:
            v = v * (f.T @ f)
    return v


def _generator(random_state, device) -> torch.Generator:
    if isinstance(random_state, torch.Generator):
        return random_state
    gen = torch.Generator(device=device)
    if random_state is None:
        gen.seed()
    else:
        gen.manual_seed(int(random_state))
    return gen


def _randn(shape, gen, dtype, device) -> Tensor:
    # draw on the generator's device, then move (CPU generators drive CUDA tensors too)
    return torch.randn(shape, generator=gen, dtype=dtype, device=gen.device).to(device)


def _check_tensor(tensor, name="tensor") -> None:
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {tensor.dtype}")
    if tensor.dim() < 2:
        raise ValueError(f"{name}: expected a tensor with at least 2 modes, got shape {tuple(tensor.shape)}")
    if tensor.numel() == 0:
        raise ValueError(f"{name}: expected a non-empty tensor, got shape {tuple(tensor.shape)}")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name}: expected finite values, found NaN or Inf")


def _check_float(name, v, low=0.0, strict=False):
    if (
        isinstance(v, bool)
        or not isinstance(v, (int, float))
        or not math.isfinite(v)
        or v < low
        or (strict and v == low)
    ):
        raise ValueError(f"{name}: expected a float {'>' if strict else '>='} {low}, got {v!r}")


def _check_random_state(random_state):
    if (
        random_state is not None
        and not isinstance(random_state, (int, torch.Generator))
        or isinstance(random_state, bool)
    ):
        raise TypeError(f"random_state: expected None, an int or a torch.Generator, got {type(random_state).__name__}")


def _normalize(f: Tensor) -> tuple[Tensor, Tensor]:
    norms = torch.linalg.vector_norm(f, dim=0)
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    return f / safe, norms


def _rel_error(t: Tensor, weights: Tensor | None, factors: Sequence[Tensor], t_norm: float) -> float:
    diff = torch.linalg.vector_norm(t - cp_to_tensor(weights, factors)).item()
    return diff / t_norm if t_norm > 0 else diff


def _sorted_result(weights, factors, dtype, **kw) -> CPResult:
    # sign of each weight moved into the first factor, weights >= 0, largest first
    sign = torch.where(weights < 0, -torch.ones_like(weights), torch.ones_like(weights))
    factors = [factors[0] * sign] + list(factors[1:])
    weights = weights.abs()
    order = torch.argsort(weights, descending=True)
    return CPResult(weights[order].to(dtype), [f[:, order].to(dtype) for f in factors], **kw)


# ---------------------------------------------------------------------------- CP-ALS
def cp_als(
    tensor: Tensor,
    rank: int,
    n_iter_max: int = 100,
    tol: float = 1e-8,
    init: str | CPResult | Sequence[Tensor] = "svd",
    random_state=None,
    ridge: float = 1e-10,
) -> CPResult:
    """CP decomposition by alternating least squares.

    Args:
        tensor: (p_1, ..., p_d), d >= 2, floating point, finite. Computed in float64; the
            result has the tensor's dtype.
        rank: number of components R >= 1.
        n_iter_max: most ALS sweeps (one sweep updates every factor once).
        tol: stop when the fit 1 - rel_error changes by less than ``tol`` between sweeps.
        init: "svd" (leading left singular vectors of each unfolding, random columns where
            R > p_n), "random" (Gaussian), or a starting point: a CPResult or a list of d
            factor matrices (p_n, R) (weights taken as 1).
        random_state: None, an int seed or a torch.Generator (random init and padding).
        ridge: relative Tikhonov term: each mode solves
            A_n (V_n + ridge * mean(diag V_n) I) = MTTKRP_n, V_n the Hadamard product of the
            other factors' Gram matrices. It keeps the solves well posed when components
            become collinear and damps the diverging, mutually cancelling components of
            degenerate problems (the "swamps" of ALS); 1e-10 does not limit the accuracy of
            exact recoveries measurably.

    Returns:
        CPResult with weights, unit-norm factors, rel_error, fit history and n_iter.
    Columns are normalized after each update (norms into the weights); a column that
    vanishes is re-drawn at random with weight 0.
    """
    _check_tensor(tensor)
    check_int("rank", rank, 1)
    check_int("n_iter_max", n_iter_max, 0)
    _check_float("tol", tol)
    _check_float("ridge", ridge)
    _check_random_state(random_state)
    start = time.perf_counter()
    t = tensor.detach().to(torch.float64)
    d, shape, device = t.dim(), t.shape, t.device
    gen = None

    def rng():
        nonlocal gen
        if gen is None:
            gen = _generator(random_state, "cpu")
        return gen

    if isinstance(init, CPResult) or isinstance(init, (list, tuple)):
        given = list(init.factors) if isinstance(init, CPResult) else list(init)
        if len(given) != d or any(
            not isinstance(f, Tensor) or tuple(f.shape) != (p, rank) for f, p in zip(given, shape)
        ):
            got = [tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__ for f in given]
            raise ValueError(f"init: expected {d} factor matrices of shapes {[(p, rank) for p in shape]}, got {got}")
        factors = [f.detach().to(device=device, dtype=torch.float64).clone() for f in given]
        if isinstance(init, CPResult):
            factors[0] = factors[0] * init.weights.detach().to(device=device, dtype=torch.float64)
        if not all(torch.isfinite(f).all() for f in factors):
            raise ValueError("init: expected finite factor matrices, found NaN or Inf")
    elif init == "svd":
        factors = []
        for n, p in enumerate(shape):
            k = min(rank, p, t.numel() // p)
            u, _, _ = truncated_svd(_unfold(t, n), rank=k)
            if k < rank:
                u = torch.cat([u, _randn((p, rank - k), rng(), torch.float64, device) / math.sqrt(p)], dim=1)
            factors.append(u)
    elif init == "random":
        factors = [_randn((p, rank), rng(), torch.float64, device) / math.sqrt(p) for p in shape]
    else:
        raise ValueError(f"init: expected one of {INITS}, a CPResult or a list of factors, got {init!r}")

    t_norm = torch.linalg.vector_norm(t).item()
    weights = torch.ones(rank, dtype=torch.float64, device=device)
    if t_norm == 0:
        factors = [_normalize(f)[0] for f in factors]
        return _sorted_result(
            torch.zeros_like(weights),
            factors,
            tensor.dtype,
            rel_error=0.0,
            n_iter=0,
            history=[0.0],
            converged=True,
            time_s=time.perf_counter() - start,
        )
    # fold any scale of the start into the weights
    for n in range(d):
        factors[n], norms = _normalize(factors[n])
        weights = weights * norms
    history = [_rel_error(t, weights, factors, t_norm)]
    eye = torch.eye(rank, dtype=torch.float64, device=device)
    converged = False
    it = 0
    for it in range(1, n_iter_max + 1):  # noqa: B007 (read after the loop: iterations run)
        for n in range(d):
            v = _hadamard_grams(factors, skip=n)
            lam = ridge * torch.diagonal(v).mean().clamp_min(1e-300)
            m = _mttkrp(t, factors, n)
            sol = torch.linalg.solve(v + lam * eye, m.T).T  # V symmetric
            factors[n], weights = _normalize(sol)
            dead = weights == 0
            if dead.any():
                fresh = _randn((shape[n], int(dead.sum())), rng(), torch.float64, device)
                factors[n][:, dead] = _normalize(fresh)[0]
        history.append(_rel_error(t, weights, factors, t_norm))
        if not math.isfinite(history[-1]):
            raise FloatingPointError("cp_als: the fit became NaN/Inf; try a larger ridge")
        if abs(history[-2] - history[-1]) < tol:
            converged = True
            break
    return _sorted_result(
        weights,
        factors,
        tensor.dtype,
        rel_error=history[-1],
        n_iter=it,
        history=history,
        converged=converged,
        time_s=time.perf_counter() - start,
    )


# ---------------------------------------------------------------------------- over-parameterized GD
def cp_overparam(
    tensor: Tensor,
    rank: int,
    width: int | None = None,
    n_steps: int = 3000,
    lr: float = 0.5,
    init_scale: float | None = None,
    check_every: int = 25,
    reinit_every: int = 200,
    reinit_growth: float = 1.0,
    reinit_below: float = 0.1,
    switch_tol: float = 1e-2,
    probe_below: float = 0.2,
    probe_iter: int = 10,
    lazy: bool = False,
    polish: bool = True,
    n_iter_max: int = 100,
    tol: float = 1e-10,
    random_state=None,
) -> CPResult:
    r"""Over-parameterized CP by gradient descent (after Wang, Wu, Lee, Ma & Ge, NeurIPS 2020).

    Fits m = ``width`` > rank components u_i^{(1)} o ... o u_i^{(d)} (the weight c_i is the
    product of the column norms) to T / ||T|| by gradient descent on
    f = 1/2 || sum_i u_i^{(1)} o ... o u_i^{(d)} - T/||T|| ||^2, keeps the ``rank`` largest
    components and polishes them with :func:`cp_als`.

    Schedule (ours; the paper leaves these constants open):
      * start: every column i.i.d. Gaussian with norm ~ ``init_scale`` in every mode
        (default 0.3 per mode, i.e. components of weight 0.3^d, well below the target's
        components, which have weight ~1/sqrt(rank); much smaller starts make order-4
        growth, d/dt x ~ x^3, needlessly slow); balanced across modes, which gradient
        flow preserves.
      * step: all modes at once, U_n -= lr / (1 + ||V_n||_F) * (U_n V_n - MTTKRP_n(T)) with V_n
        the Hadamard product of the other modes' Gram matrices: a step bounded by the local
        curvature, so the same ``lr`` is stable from the tiny start to the end.
      * growth: a small component grows by its random correlation with the residual, like a
        tensor power iteration (d/dt <u, a> ~ <u, a>^{d-1}); components that caught a
        direction take it over and leave the residual to the others.
      * every ``reinit_every`` steps: a component whose weight is below ``reinit_below`` x
        max(largest weight, 1/rank) and that has not grown by ``reinit_growth`` x since the
        previous such check is re-drawn at the initial scale (a fresh chance to correlate
        with the residual). Growth from a small start is slow at first (hyperbolic, like a
        power iteration), so this period is longer than the ``check_every`` period at which
        the fit is recorded, the switch rule tested and columns re-balanced across modes.
      * switch: at a check where the full model's relative error is below ``probe_below``,
        take the ``rank`` largest components (after merging near-duplicates, |product of
        per-mode cosines| > 0.9, since descent often splits a target component over several
        parallel ones) and run ``probe_iter`` ALS sweeps from them; if that reaches a relative
        error below ``switch_tol``, stop gradient descent. Otherwise go on until ``n_steps``.
      * polish: ALS from the probe (or from the merged top components) to convergence
        (``n_iter_max``, ``tol``).
    ``lazy=True``: components start at norm 1 per mode (``init_scale`` default 1.0) and are
    never re-drawn, the large-initialization regime the paper compares against.

    Returns a CPResult (history: relative error of the full over-parameterized model at each
    check, then the ALS sweeps); ``n_steps`` gradient steps and ``n_reinit`` re-draws.
    """
    _check_tensor(tensor)
    check_int("rank", rank, 1)
    if width is None:
        width = max(4 * rank, rank + 4)
    check_int("width", width, rank)
    check_int("n_steps", n_steps, 0)
    check_int("check_every", check_every, 1)
    check_int("reinit_every", reinit_every, 1)
    check_int("n_iter_max", n_iter_max, 0)
    _check_float("lr", lr, strict=True)
    if init_scale is None:
        init_scale = 1.0 if lazy else 0.3
    _check_float("init_scale", init_scale, strict=True)
    _check_float("reinit_growth", reinit_growth, low=1.0)
    _check_float("reinit_below", reinit_below)
    _check_float("switch_tol", switch_tol)
    _check_float("probe_below", probe_below)
    check_int("probe_iter", probe_iter, 0)
    _check_float("tol", tol)
    _check_random_state(random_state)
    start = time.perf_counter()
    t = tensor.detach().to(torch.float64)
    d, shape, device = t.dim(), t.shape, t.device
    t_norm = torch.linalg.vector_norm(t).item()
    if t_norm == 0:
        return cp_als(tensor, rank, n_iter_max=0, init="random", random_state=random_state)
    tn = t / t_norm
    gen = _generator(random_state, "cpu")

    def draw(p, k):
        return _randn((p, k), gen, torch.float64, device) * (init_scale / math.sqrt(p))

    u = [draw(p, width) for p in shape]
    history: list[float] = []
    last_weight = None
    n_reinit = 0
    step = 0
    next_reinit = reinit_every
    probed = None

    def top_factors():
        return _consolidate(u, rank)

    while step < n_steps:
        for _ in range(min(check_every, n_steps - step)):
            grads = []
            for n in range(d):
                v = _hadamard_grams(u, skip=n)
                g = u[n] @ v - _mttkrp(tn, u, n)
                grads.append(g * (lr / (1.0 + torch.linalg.matrix_norm(v).item())))
            for n in range(d):
                u[n] = u[n] - grads[n]
            step += 1
        u = _rebalance(u)
        history.append(_rel_error(tn, None, u, 1.0))
        if not math.isfinite(history[-1]):
            raise FloatingPointError("cp_overparam: gradient descent diverged; lower lr")
        if history[-1] < probe_below:
            probe = cp_als(tn, rank, n_iter_max=probe_iter, tol=0.0, init=top_factors(), random_state=gen)
            if probe.rel_error < switch_tol:
                probed = probe
                break
        if lazy or step < next_reinit:
            continue
        next_reinit += reinit_every
        w = _component_weights(u)
        # weights of an exact fit of T/||T|| are O(1/sqrt(rank)): 1/rank is a safe floor
        small = w < reinit_below * max(w.max().item(), 1.0 / rank)
        if last_weight is not None:
            small &= w < reinit_growth * last_weight
        if small.any():
            k = int(small.sum())
            n_reinit += k
            for n, p in enumerate(shape):
                u[n][:, small] = draw(p, k)
            w = _component_weights(u)
        last_weight = w
    if probed is not None:
        factors = list(probed.factors)
        factors[0] = factors[0] * probed.weights
    else:
        factors = top_factors()
    gd_time = time.perf_counter() - start
    if not polish:
        weights = torch.ones(rank, dtype=torch.float64, device=device)
        normed = []
        for f in factors:
            f, norms = _normalize(f)
            normed.append(f)
            weights = weights * norms
        err = _rel_error(tn, weights, normed, 1.0)
        return _sorted_result(
            weights * t_norm,
            normed,
            tensor.dtype,
            rel_error=err,
            n_iter=0,
            history=history + [err],
            converged=False,
            n_steps=step,
            n_reinit=n_reinit,
            time_s=gd_time,
        )
    factors[0] = factors[0] * t_norm
    res = cp_als(t, rank, n_iter_max=n_iter_max, tol=tol, init=factors, random_state=gen)
    return _sorted_result(
        res.weights,
        res.factors,
        tensor.dtype,
        rel_error=res.rel_error,
        n_iter=res.n_iter,
        history=history + res.history,
        converged=res.converged,
        n_steps=step,
        n_reinit=n_reinit,
        time_s=time.perf_counter() - start,
    )


def _consolidate(u: Sequence[Tensor], rank: int, cos_min: float = 0.9) -> list[Tensor]:
    """The ``rank`` largest components after merging near-duplicates.

    Over-parameterized descent often splits one target component over several nearly
    parallel ones (each carrying part of its weight). Going down the components by weight,
    one whose cosine with an already kept one (the product of the per-mode cosines) exceeds
    ``cos_min`` in magnitude is merged into it (its weight projected onto the kept
    direction and added); then the ``rank`` largest merged components are returned as
    factors whose first mode carries the weight."""
    normed, norms = zip(*(_normalize(f) for f in u))
    w = torch.stack(norms).prod(dim=0)
    cos = torch.ones(w.shape[0], w.shape[0], dtype=w.dtype, device=w.device)
    for f in normed:
        cos = cos * (f.T @ f)
    order = torch.argsort(w, descending=True).tolist()
    w_l, cos_l = w.tolist(), cos.tolist()
    kept: list[int] = []
    merged: list[float] = []
    for j in order:
        best = max(range(len(kept)), key=lambda k: abs(cos_l[kept[k]][j]), default=None)
        if best is not None and abs(cos_l[kept[best]][j]) > cos_min:
            merged[best] += w_l[j] * cos_l[kept[best]][j]
        else:
            kept.append(j)
            merged.append(w_l[j])
    top = sorted(range(len(kept)), key=lambda k: -abs(merged[k]))[:rank]
    idx = torch.tensor([kept[k] for k in top], device=w.device)
    weights = torch.tensor([merged[k] for k in top], dtype=w.dtype, device=w.device)
    factors = [f[:, idx] for f in normed]
    factors[0] = factors[0] * weights
    if len(top) < rank:  # fewer distinct directions than rank: pad with tiny random columns
        extra = rank - len(top)
        factors = [
            torch.cat([f, 1e-3 * g[:, :extra]], dim=1)
            for f, g in zip(
                factors,
                [
                    torch.linalg.qr(torch.randn(f.shape[0], max(extra, f.shape[0]), dtype=f.dtype, device=f.device))[0]
                    for f in factors
                ],
            )
        ]
    return factors


def _component_weights(u: Sequence[Tensor]) -> Tensor:
    w = torch.ones(u[0].shape[1], dtype=u[0].dtype, device=u[0].device)
    for f in u:
        w = w * torch.linalg.vector_norm(f, dim=0)
    return w


def _rebalance(u: Sequence[Tensor]) -> list[Tensor]:
    """Same components, every mode's column i given norm c_i^(1/d)."""
    d = len(u)
    normed, norms = zip(*(_normalize(f) for f in u))
    w = torch.stack(norms).prod(dim=0)
    per_mode = w ** (1.0 / d)
    return [f * per_mode for f in normed]
