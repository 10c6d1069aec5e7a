r"""Over-parameterized symmetric tensor decomposition: the lazy (NTK) regime and the rich regime.

Setting of Wang, Wu, Lee, Ma & Ge, "Beyond Lazy Training for Over-parameterized Tensor
Decomposition" (NeurIPS 2020, arXiv:2010.11356), Section 1: a symmetric order-l tensor
T* = sum_{j<=r} a_j u_j^{(x)l} in (R^d)^{(x)l} is fitted by m > r symmetric rank-one terms with
gradient descent. The paper proves that in the lazy training regime (gradient descent that stays
near its random start, i.e. the model's first-order Taylor expansion there) fitting needs
m = Omega(d^(l-1)) components, while a variant of gradient descent reaches an approximate
decomposition with m = O*(r^(2.5 l) log d). This module implements both regimes so that the
separation can be measured:

``rich_gd`` (the paper's gradient-descent variant, as far as we could read it):
  * model: each component is 2-homogeneous in its parameter vector w_i,
    T(W) = sum_i ||w_i||^2 (w_i/||w_i||)^{(x)l}: the weight of component i is ||w_i||^2 and its
    direction w_i/||w_i||, as the output weight and input weights of a balanced two-layer
    network (the paper's link to over-parameterized networks).
  * objective: f(W) = 1/2 ||T(W) - T*||_F^2 + lambda/2 ||W||_F^2; the penalty is the sum of the
    component weights, so a component grows only while its correlation with the residual,
    <T* - T(W), wbar_i^{(x)l}>, exceeds lambda/2.
  * small random start (every w_i of norm ``init_scale``), epochs of ``epoch_steps`` plain
    gradient steps, and at the start of every epoch the components that did not grow (weight
    below ``reinit_below`` x the start weight) are re-drawn at random: fresh chances to correlate
    with what is left of the residual.
  What we could read, and where we depart or had to choose: the algorithm section of the paper
  was not reachable from here. The stored copies give its abstract and introduction (the
  objective over sum_i c_i u_i^{(x)l}, the two width bounds), the NeurIPS reviews (its objective
  "quite different to the classical one", its algorithm "different to simple gradient descent"),
  the summary of the authors' talk (escaping bad local minima through random correlation with
  the target, amplified as in the tensor power method) and third-party proof notes citing it
  (homogeneous small initialization, periodic re-initialization, a symmetric regularized
  objective). The structure above is our reading of these, not the letter of the paper's
  Algorithm 1; if that differs (parameterization, regularizer, re-initialization rule), this is
  a variant in its spirit. The step size, epoch length, number of epochs, start scale,
  re-initialization threshold, and the schedule that halves lambda every epoch down to
  ``reg_min`` (so that the final fit is not biased by the penalty: an exact component keeps a
  residual of lambda/2 along itself) are ours. The paper's guarantee is for its own constants;
  we run plain gradient descent, stop an instance once its relative error is below ``tol``
  (checked every ``check_every`` steps), and use no ALS or other polish.

``lazy_gd`` (the lazy / NTK regime the paper's lower bound is about):
  * model: the standard (non-homogeneous) parameterization with the NTK scaling and the
    centring of Chizat, Oyallon & Bach (2019, "On lazy training in differentiable
    programming"): T_alpha(W) = alpha (h(W) - h(W_0)), h(W) = m^{-1/2} sum_i w_i^{(x)l}, columns
    of W_0 i.i.d. N(0, I/d) (norm ~1); the centring makes the model start at 0 whatever alpha.
  * gradient descent on 1/2 ||T_alpha(W) - T*||_F^2 with step ``lr_scale`` / (alpha^2 L), L the
    largest eigenvalue of J^T J (J the Jacobian of h at W_0, estimated by power iteration): the
    function-space dynamics do not depend on alpha while the parameters move by O(1/alpha), so a
    large alpha is lazy training; ``rel_movement`` = ||W - W_0||_F / ||W_0||_F records how lazy a
    run was. As alpha grows the run tends to gradient descent on the linearized model, whose best
    fit is the projection of T* on the tangent space at W_0 (``tangent_residual`` computes it).
    The tangent space of m components has dimension at most m d, and the symmetric tensors
    dimension C(d + l - 1, l), so the lazy regime cannot fit a generic target below
    m ~ C(d + l - 1, l) / d (~ d^(l-1) / l!): a dimension count of the same order as the paper's
    lower bound (whose proof we could not read).

All computations are in float64; targets may be batched (``batched=True``: leading batch
dimension, one independent run per instance, vectorized) to share the Python overhead of small
problems. Results keep the batch dimension in that case.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from tensorpress._validate import check_int, is_int


@dataclass
class SymmetricCPResult:
    """T ~ sum_i weights[..., i] * directions[..., :, i]^{(x)order}.

    Batched results carry a leading batch dimension on every tensor field and a list per
    instance for the scalar ones (rel_error, rel_movement, n_steps, converged).
    history[k] holds the relative error of every instance at the k-th check (a list per check).
    """

    weights: Tensor
    directions: Tensor
    order: int
    rel_error: list[float]
    rel_movement: list[float]
    n_steps: list[int]
    converged: list[bool]
    history: list[list[float]] = field(default_factory=list)
    n_reinit: list[int] = field(default_factory=list)
    time_s: float = 0.0

    def to_tensor(self) -> Tensor:
        return symmetric_cp_tensor(self.weights, self.directions, self.order)


# ---------------------------------------------------------------------------- tensor helpers
def symmetric_cp_tensor(weights: Tensor, directions: Tensor, order: int) -> Tensor:
    """sum_i weights[..., i] directions[..., :, i]^{(x)order}: (..., d, ..., d)."""
    if not is_int(order) or order < 2:
        raise ValueError(f"order: expected an int >= 2, got {order!r}")
    if directions.dim() < 2 or weights.shape != directions.shape[:-2] + directions.shape[-1:]:
        raise ValueError(
            f"weights, directions: expected shapes (..., m) and (..., d, m), got {tuple(weights.shape)} "
            f"and {tuple(directions.shape)}"
        )
    batch, d = directions.shape[:-2], directions.shape[-2]
    w = directions.reshape(-1, d, directions.shape[-1])
    k = _powers(w, order - 1)  # (B, d^(order-1), m)
    out = (w * weights.reshape(w.shape[0], 1, -1)) @ k.transpose(1, 2)
    return out.reshape(*batch, *([d] * order))


def _powers(w: Tensor, p: int) -> Tensor:
    """Columns w_i^{(x)p} flattened row-major: (B, d, m) -> (B, d^p, m)."""
    out = w
    for _ in range(p - 1):
        out = (out[:, :, None, :] * w[:, None, :, :]).reshape(w.shape[0], -1, w.shape[2])
    return out


def _symmetrize_first_mode(x: Tensor, order: int) -> Tensor:
    """Average of x (B, d, ..., d), symmetric in its last order-1 modes, over the position of its
    first mode: the symmetric part of x."""
    return sum(torch.movedim(x, 1, 1 + p) for p in range(order)) / order  # type: ignore[return-value]


def _check_target(target, batched: bool, name: str = "target") -> tuple[Tensor, int]:
    """float64 (B, d^order) copy of the target(s) and the order; errors name the argument."""
    if not isinstance(target, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(target).__name__}")
    if not target.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {target.dtype}")
    shape = tuple(target.shape[1:] if batched else target.shape)
    if batched and target.dim() < 1:
        raise ValueError(f"{name}: batched=True needs a leading batch dimension, got shape {tuple(target.shape)}")
    if len(shape) < 3 or len(set(shape)) != 1 or shape[0] < 1 or (batched and target.shape[0] < 1):
        what = "(B, d, d, d, ...)" if batched else "(d, d, d, ...)"
        raise ValueError(f"{name}: expected a cubical tensor of order >= 3, shape {what}, got {tuple(target.shape)}")
    if not torch.isfinite(target).all():
        raise ValueError(f"{name}: expected finite values, found NaN or Inf")
    order, d = len(shape), shape[0]
    t = target.detach().to(torch.float64).reshape(-1, *shape)
    for p in range(1, order):  # symmetric: invariant under the transposition of modes 0 and p
        if not torch.allclose(t, t.transpose(1, 1 + p), rtol=1e-8, atol=1e-12 * max(t.abs().max().item(), 1e-300)):
            raise ValueError(f"{name}: expected a symmetric tensor (equal under any permutation of its modes)")
    return t.reshape(t.shape[0], d**order).clone(), order


def _check_pos(name, v, strict=True, upper=None):
    ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and (v > 0 if strict else v >= 0)
    if ok and upper is not None:
        ok = v <= upper
    if not ok:
        rng = f"{'>' if strict else '>='} 0" + (f" and <= {upper}" if upper is not None else "")
        raise ValueError(f"{name}: expected a finite float {rng}, got {v!r}")


def _generator(random_state) -> torch.Generator:
    if isinstance(random_state, torch.Generator):
        return random_state
    if random_state is not None and (not is_int(random_state)):
        raise TypeError(f"random_state: expected None, an int or a torch.Generator, got {type(random_state).__name__}")
    gen = torch.Generator()
    if random_state is None:
        gen.seed()
    else:
        gen.manual_seed(random_state)
    return gen


def _unbatch(res: SymmetricCPResult, batched: bool) -> SymmetricCPResult:
    if not batched:
        res.weights, res.directions = res.weights[0], res.directions[0]
    return res


# ---------------------------------------------------------------------------- the rich regime
def rich_gd(
    target: Tensor,
    width: int,
    *,
    init_scale: float | None = None,
    reg: float = 0.05,
    reg_min: float = 1e-4,
    lr: float = 0.05,
    epoch_steps: int = 200,
    n_epochs: int = 30,
    reinit_below: float = 1.0,
    tol: float = 1e-2,
    check_every: int = 50,
    batched: bool = False,
    random_state=None,
) -> SymmetricCPResult:
    r"""The paper's gradient-descent variant on 2-homogeneous components (see the module docstring).

    Args:
        target: symmetric (d, ..., d) tensor of order l >= 3 (or (B, d, ..., d) with
            ``batched=True``). Fitted after scaling to unit Frobenius norm (so ``init_scale``,
            ``reg`` and ``lr`` are relative to it); results are scaled back.
        width: number of components m >= 1.
        init_scale: norm of every freshly drawn w_i (its weight is init_scale^2). Default
            0.01 m^(-1/4): the m fresh components then add up to ~sqrt(m) init_scale^2 = 1e-4 of
            the target's norm whatever m (they are re-drawn every epoch, so this is an error
            floor; a fixed 0.01 gave 2e-3 at m = 400, above a 1e-3 success threshold).
        reg: lambda of the first epoch; halved every epoch down to ``reg_min``.
        lr: gradient step.
        epoch_steps: gradient steps per epoch; n_epochs: most epochs.
        reinit_below: at the start of an epoch, components whose weight is below
            reinit_below x init_scale^2 (they did not grow) are re-drawn.
        tol: an instance stops once its relative error ||T(W) - T*|| / ||T*|| is at most tol.
        check_every: steps between error checks (history entries).
        random_state: None, an int seed or a torch.Generator (CPU).

    Returns:
        SymmetricCPResult: weights ||w_i||^2 and unit directions, relative error, relative
        movement ||W - W_start|| / ||W_start|| (W_start = the first random start), steps, whether
        tol was reached, history and re-draw counts.
    """
    t, order = _check_target(target, batched)
    check_int("width", width, 1)
    if init_scale is None:
        init_scale = 0.01 * width**-0.25
    for name, v in (("init_scale", init_scale), ("lr", lr)):
        _check_pos(name, v)
    for name, v in (("reg", reg), ("reg_min", reg_min), ("reinit_below", reinit_below), ("tol", tol)):
        _check_pos(name, v, strict=False)
    for name, v in (("epoch_steps", epoch_steps), ("n_epochs", n_epochs), ("check_every", check_every)):
        check_int(name, v, 1)
    gen = _generator(random_state)
    start = time.perf_counter()
    b, d = t.shape[0], round(t.shape[1] ** (1 / order))
    norms = torch.linalg.vector_norm(t, dim=1)
    scale = torch.where(norms > 0, norms, torch.ones_like(norms))
    tn = (t / scale[:, None]).reshape(b, d, -1)

    def draw(k: int) -> Tensor:
        g = torch.randn(b, d, k, generator=gen, dtype=torch.float64)
        return g * (init_scale / torch.linalg.vector_norm(g, dim=1, keepdim=True))

    w = draw(width)
    w_start = w.clone()
    active = norms > 0  # a zero target is fitted by the empty decomposition: nothing to run
    w[~active] = 0.0
    err = torch.where(active, torch.ones_like(norms), torch.zeros_like(norms))
    n_steps = torch.zeros(b, dtype=torch.long)
    n_reinit = torch.zeros(b, dtype=torch.long)
    history: list[list[float]] = [err.tolist()]
    lam = reg
    for _ in range(n_epochs):
        if not active.any():
            break
        small = (w.pow(2).sum(1) < reinit_below * init_scale**2) & active[:, None]
        if small.any():
            fresh = draw(width)
            w = torch.where(small[:, None, :], fresh, w)
            n_reinit += small.sum(1)
        for s in range(epoch_steps):
            nrm = torch.linalg.vector_norm(w, dim=1, keepdim=True).clamp_min(1e-300)  # (B, 1, m)
            wbar = w / nrm
            k = _powers(wbar, order - 1)  # (B, d^(l-1), m)
            resid = (wbar * nrm.pow(2)) @ k.transpose(1, 2) - tn  # T(W) - T*, (B, d, d^(l-1))
            v = resid @ k  # E(., wbar_i, ..., wbar_i): (B, d, m)
            g = (wbar * v).sum(1, keepdim=True)  # <E, wbar_i^(x)l>
            grad = nrm * ((2 - order) * g * wbar + order * v) + lam * w
            w = torch.where(active[:, None, None], w - lr * grad, w)
            n_steps += active.long()
            if (s + 1) % check_every == 0 or s + 1 == epoch_steps:
                err = torch.where(active, _rel_error(w, tn, order), err)
                history.append(err.tolist())
                active &= err > tol
                if not active.any():
                    break
        lam = max(lam / 2, reg_min)
    err = torch.where(norms > 0, _rel_error(w, tn, order), err)
    nrm = torch.linalg.vector_norm(w, dim=1)
    wbar = w / nrm.clamp_min(1e-300)[:, None, :]
    res = SymmetricCPResult(
        weights=nrm.pow(2) * scale[:, None],
        directions=wbar,
        order=order,
        rel_error=err.tolist(),
        rel_movement=(
            torch.linalg.vector_norm((w - w_start).reshape(b, -1), dim=1)
            / torch.linalg.vector_norm(w_start.reshape(b, -1), dim=1)
        ).tolist(),
        n_steps=n_steps.tolist(),
        converged=(err <= tol).tolist(),
        history=history,
        n_reinit=n_reinit.tolist(),
        time_s=time.perf_counter() - start,
    )
    return _unbatch(res, batched)


def _rel_error(w: Tensor, tn: Tensor, order: int) -> Tensor:
    """||sum_i ||w_i||^2 wbar_i^(x)l - T_n|| for unit-norm targets T_n (B, d, d^(l-1))."""
    nrm = torch.linalg.vector_norm(w, dim=1, keepdim=True).clamp_min(1e-300)
    wbar = w / nrm
    model = (wbar * nrm.pow(2)) @ _powers(wbar, order - 1).transpose(1, 2)
    return torch.linalg.vector_norm((model - tn).reshape(w.shape[0], -1), dim=1)


# ---------------------------------------------------------------------------- the lazy regime
def lazy_gd(
    target: Tensor,
    width: int,
    *,
    alpha: float = 1e3,
    lr_scale: float = 1.0,
    n_steps: int = 2000,
    tol: float = 1e-2,
    check_every: int = 50,
    power_iter: int = 30,
    batched: bool = False,
    random_state=None,
) -> SymmetricCPResult:
    r"""Gradient descent in the lazy (NTK) regime: alpha-scaled, centred model (module docstring).

    Args:
        target: symmetric (d, ..., d) tensor of order l >= 3 (or batched (B, d, ..., d)).
        width: number of components m >= 1.
        alpha: the NTK scale; parameters move by O(1/alpha) (1e3: well below 1% on our grids).
        lr_scale: step in units of 1 / (alpha^2 L), L the top eigenvalue of J^T J at the start
            (< 2 for the linearized model to be stable).
        n_steps: most gradient steps; tol: an instance stops at relative error <= tol.
        check_every: steps between error checks; power_iter: power iterations for L.
        random_state: None, an int seed or a torch.Generator (CPU).

    Returns:
        SymmetricCPResult whose weights/directions express the fitted model
        alpha (h(W) - h(W_0)) as 2m signed rank-one terms (alpha/sqrt(m) on w_i, -alpha/sqrt(m) on
        the start's w_i^0; directions not normalized: ``to_tensor()`` cancels two sums of size
        ~alpha, so it is accurate to ~alpha x machine epsilon, not to the last bit of rel_error),
        the relative error, the relative
        parameter movement ||W - W_0||_F / ||W_0||_F, steps and history.
    """
    t, order = _check_target(target, batched)
    check_int("width", width, 1)
    _check_pos("alpha", alpha)
    _check_pos("lr_scale", lr_scale, upper=2.0)
    _check_pos("tol", tol, strict=False)
    check_int("n_steps", n_steps, 0)
    check_int("check_every", check_every, 1)
    check_int("power_iter", power_iter, 1)
    gen = _generator(random_state)
    start = time.perf_counter()
    b, d = t.shape[0], round(t.shape[1] ** (1 / order))
    norms = torch.linalg.vector_norm(t, dim=1)
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    tgt = t.reshape(b, d, -1)
    w0 = torch.randn(b, d, width, generator=gen, dtype=torch.float64) / math.sqrt(d)
    c = alpha / math.sqrt(width)
    h0 = w0 @ _powers(w0, order - 1).transpose(1, 2)  # sum_i w_i^(x)l, (B, d, d^(l-1))
    top = _ntk_top_eigenvalue(w0, order, power_iter, gen)  # of J^T J with J = d h / d W (h without c)
    lr = (lr_scale / (c**2 * top))[:, None, None]
    w = w0.clone()
    active = norms > 0
    err = torch.where(active, torch.ones_like(norms), torch.zeros_like(norms))
    steps = torch.zeros(b, dtype=torch.long)
    history: list[list[float]] = [err.tolist()]
    for s in range(n_steps):
        k = _powers(w, order - 1)
        resid = c * (w @ k.transpose(1, 2) - h0) - tgt
        if s % check_every == 0:
            err = torch.where(active, torch.linalg.vector_norm(resid.reshape(b, -1), dim=1) / safe, err)
            history.append(err.tolist())
            active &= err > tol
            if not active.any():
                break
        grad = c * order * (resid @ k)  # J^T E for a symmetric residual
        w = torch.where(active[:, None, None], w - lr * grad, w)
        steps += active.long()
    resid = c * (w @ _powers(w, order - 1).transpose(1, 2) - h0) - tgt
    err = torch.where(norms > 0, torch.linalg.vector_norm(resid.reshape(b, -1), dim=1) / safe, err)
    res = SymmetricCPResult(
        weights=torch.cat([torch.full((b, width), c), torch.full((b, width), -c)], dim=1).to(torch.float64),
        directions=torch.cat([w, w0], dim=2),
        order=order,
        rel_error=err.tolist(),
        rel_movement=(
            torch.linalg.vector_norm((w - w0).reshape(b, -1), dim=1)
            / torch.linalg.vector_norm(w0.reshape(b, -1), dim=1)
        ).tolist(),
        n_steps=steps.tolist(),
        converged=(err <= tol).tolist(),
        history=history,
        time_s=time.perf_counter() - start,
    )
    return _unbatch(res, batched)


def _jvp(w: Tensor, u: Tensor, order: int) -> Tensor:
    """J u for h(W) = sum_i w_i^(x)l: the symmetric part of l sum_i u_i (x) w_i^(x)(l-1)."""
    b, d, _ = w.shape
    x = u @ _powers(w, order - 1).transpose(1, 2)  # (B, d, d^(l-1))
    return order * _symmetrize_first_mode(x.reshape(b, *([d] * order)), order).reshape(b, d, -1)


def _ntk_top_eigenvalue(w: Tensor, order: int, n_iter: int, gen: torch.Generator) -> Tensor:
    """Largest eigenvalue of J^T J (per instance) by power iteration on the parameters."""
    u = torch.randn(w.shape, generator=gen, dtype=torch.float64)
    k = _powers(w, order - 1)
    lam = torch.ones(w.shape[0], dtype=torch.float64)
    for _ in range(n_iter):
        u = u / torch.linalg.vector_norm(u.reshape(u.shape[0], -1), dim=1)[:, None, None]
        ju = _jvp(w, u, order)
        jtju = order * (ju @ k)
        lam = (u * jtju).reshape(u.shape[0], -1).sum(1)
        u = jtju
    return lam * 1.02  # power iteration approaches from below: a small margin keeps the step stable


def tangent_residual(target: Tensor, width: int, *, random_state=None) -> float:
    """The relative error of the best fit in the tangent space at lazy_gd's random start.

    min_Delta ||J Delta - T*|| / ||T*||, J the Jacobian of h(W) = sum_i w_i^(x)l at the start
    W_0 that ``lazy_gd`` draws for the same ``random_state`` (int seeds only): what lazy training
    reaches as alpha -> infinity and the steps -> infinity. Solved in float64 by an eigen-
    decomposition of J J^T restricted to the symmetric coordinates (rank cut at 1e-10 of the top).
    """
    t, order = _check_target(target, batched=False)
    check_int("width", width, 1)
    if isinstance(random_state, torch.Generator) or random_state is None:
        raise TypeError("random_state: expected an int seed (the start must be reproducible)")
    gen = _generator(random_state)
    d = round(t.shape[1] ** (1 / order))
    w0 = torch.randn(1, d, width, generator=gen, dtype=torch.float64) / math.sqrt(d)
    # symmetric coordinates: sorted index tuples, weighted by sqrt(multiplicity) so that the
    # Euclidean inner product equals the Frobenius one on symmetric tensors
    idx = torch.combinations(torch.arange(d), r=order, with_replacement=True)
    flat = torch.zeros(idx.shape[0], dtype=torch.long)
    for p in range(order):
        flat = flat * d + idx[:, p]
    mult = torch.tensor(
        [math.factorial(order) / math.prod(math.factorial(row.count(v)) for v in set(row)) for row in idx.tolist()],
        dtype=torch.float64,
    ).sqrt()
    k = _powers(w0, order - 1)[0]  # (d^(l-1), m)
    cols = []
    for j in range(d):  # the Jacobian columns d h / d W[j, i], all i at once: sym. part of l e_j (x) w_i^(x)(l-1)
        x = torch.zeros(width, d, k.shape[0], dtype=torch.float64)
        x[:, j, :] = k.T
        x = order * _symmetrize_first_mode(x.reshape(width, *([d] * order)), order).reshape(width, -1)
        cols.append(x[:, flat] * mult)
    jm = torch.cat(cols, dim=0).T  # (n_sym, m d)
    ts = t[0, flat] * mult
    evals, evecs = torch.linalg.eigh(jm @ jm.T)
    keep = evals > 1e-10 * evals.max()
    q = evecs[:, keep]
    resid = ts - q @ (q.T @ ts)
    nt = torch.linalg.vector_norm(ts).item()
    return torch.linalg.vector_norm(resid).item() / nt if nt > 0 else 0.0
