"""Scalar-on-tensor regression with a low-rank coefficient tensor, fitted by ALS.

Model: y_i = <B, X_i> (+ b0) + eps_i, X_i a (p_1, ..., p_D) tensor, B of low CP, Tucker or
matrix rank. Every block update of the alternating least squares (ALS) is an ordinary (or
ridge) least-squares problem in one factor with the others held fixed, so the residual sum of
squares never increases (for ridge=0).

The estimators follow scikit-learn's conventions: constructor arguments are stored as given,
`fit(X, y)` returns self, fitted attributes end in `_`, `predict(X)`, `score(X, y)` (R^2).
X is (n, p_1, ..., p_D) and y is (n,), as torch tensors or numpy arrays; computation is in
float64 on the CPU (or on X's device for tensors). `predict` returns the type it was given.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from tensorpress._validate import is_int
from tensorpress.linalg import truncated_svd
from tensorpress.rank.estimator import EstimatorParams

__all__ = [
    "CPRegressor",
    "TuckerRegressor",
    "LowRankRegressor",
    "cp_degrees_of_freedom",
    "tucker_degrees_of_freedom",
    "matrix_degrees_of_freedom",
]


# ----------------------------------------------------------------------------- df formulas
def _check_dims(dims, name="dims"):
    if not isinstance(dims, (list, tuple)) or len(dims) < 1 or any(not is_int(p) or p < 1 for p in dims):
        raise ValueError(f"{name}: expected a sequence of ints >= 1, got {dims!r}")
    return tuple(int(p) for p in dims)


def _check_rank(rank, name="rank"):
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {rank!r}")
    return int(rank)


def matrix_degrees_of_freedom(rank: int, p: int, q: int) -> int:
    """Dimension of the manifold of p x q matrices of rank R: R(p + q - R), capped at p*q
    (rank >= min(p, q) is the full space)."""
    rank = _check_rank(rank)
    p, q = _check_dims((p, q), "p, q")
    if rank >= min(p, q):
        return p * q
    return rank * (p + q - rank)


def cp_degrees_of_freedom(rank: int, dims: Sequence[int]) -> int:
    """Free parameters of a rank-R CP tensor of shape dims: R(sum_d p_d - D + 1) (each rank-one
    term has sum_d p_d entries less D - 1 scalings), capped at prod_d p_d. For D = 2 the CP
    model is the rank-R matrix model and has R(p + q - R) (the R(R-1) extra directions are
    rotations of the factors that leave B unchanged); for D = 1, p_1."""
    rank = _check_rank(rank)
    dims = _check_dims(dims)
    if len(dims) == 1:
        return dims[0]
    if len(dims) == 2:
        return matrix_degrees_of_freedom(rank, *dims)
    return min(rank * (sum(dims) - len(dims) + 1), math.prod(dims))


def tucker_degrees_of_freedom(ranks: int | Sequence[int], dims: Sequence[int]) -> int:
    """Dimension of the Tucker manifold with multilinear ranks (R_1..R_D): prod_d R_d +
    sum_d R_d (p_d - R_d) (core plus Grassmann factors), capped at prod_d p_d."""
    dims = _check_dims(dims)
    rs = _tucker_ranks(ranks, len(dims))
    if any(r > p for r, p in zip(rs, dims)):
        raise ValueError(f"ranks: expected R_d <= p_d for dims {dims}, got {rs}")
    return min(math.prod(rs) + sum(r * (p - r) for r, p in zip(rs, dims)), math.prod(dims))


def _tucker_ranks(ranks, D) -> tuple[int, ...]:
    if isinstance(ranks, (int, np.integer)) and not isinstance(ranks, bool):
        ranks = (int(ranks),) * D
    if (
        not isinstance(ranks, (list, tuple))
        or len(ranks) != D
        or any(isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < 1 for r in ranks)
    ):
        raise ValueError(f"ranks: expected an int >= 1 or {D} ints >= 1 (one per mode), got {ranks!r}")
    return tuple(int(r) for r in ranks)


# ----------------------------------------------------------------------------- input checks
def _as_tensor(a, name):
    if isinstance(a, Tensor):
        t = a.detach()
    elif isinstance(a, np.ndarray) or isinstance(a, (list, tuple)):
        try:
            t = torch.as_tensor(np.asarray(a, dtype=np.float64))
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{name}: expected a numeric array, got {type(a).__name__}") from exc
    else:
        raise TypeError(f"{name}: expected a torch.Tensor or numpy array, got {type(a).__name__}")
    if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8)):
        raise TypeError(f"{name}: expected a real numeric dtype, got {t.dtype}")
    return t.to(torch.float64)


def check_Xy(X, y=None, min_modes=1):
    """Validate X (n, p_1..p_D) and y (n,) and return them as float64 tensors."""
    Xt = _as_tensor(X, "X")
    if Xt.dim() < 1 + min_modes:
        raise ValueError(f"X: expected shape (n, p_1, ..., p_D) with D >= {min_modes}, got {tuple(Xt.shape)}")
    if Xt.shape[0] < 1 or any(s < 1 for s in Xt.shape):
        raise ValueError(f"X: expected no empty dimension, got shape {tuple(Xt.shape)}")
    if not torch.isfinite(Xt).all():
        raise ValueError("X: expected finite values, found NaN or Inf")
    if y is None:
        return Xt
    yt = _as_tensor(y, "y").to(Xt.device)
    if yt.dim() == 2 and yt.shape[1] == 1:
        yt = yt[:, 0]
    if yt.dim() != 1 or yt.shape[0] != Xt.shape[0]:
        raise ValueError(f"y: expected shape ({Xt.shape[0]},) to match X's first dimension, got {tuple(yt.shape)}")
    if not torch.isfinite(yt).all():
        raise ValueError("y: expected finite values, found NaN or Inf")
    return Xt, yt


def check_fit_settings(ridge, n_iter_max, tol, init):
    """The ALS settings every regressor shares, checked (ValueError naming the argument)."""
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not ridge >= 0 or not math.isfinite(ridge):
        raise ValueError(f"ridge: expected a finite number >= 0, got {ridge!r}")
    if not is_int(n_iter_max) or n_iter_max < 1:
        raise ValueError(f"n_iter_max: expected an int >= 1, got {n_iter_max!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0:
        raise ValueError(f"tol: expected a number >= 0, got {tol!r}")
    if init not in ("moment", "random"):
        raise ValueError(f"init: expected 'moment' or 'random', got {init!r}")


def as_generator(random_state):
    """A torch.Generator from random_state: a Generator as is, an int seed, or None (fresh entropy)."""
    if isinstance(random_state, torch.Generator):
        return random_state
    g = torch.Generator()
    if random_state is None:
        g.seed()
    elif isinstance(random_state, (int, np.integer)) and not isinstance(random_state, bool):
        g.manual_seed(int(random_state))
    else:
        raise ValueError(f"random_state: expected None, an int or a torch.Generator, got {random_state!r}")
    return g


def _lstsq(Z: Tensor, y: Tensor, ridge: float) -> Tensor:
    """argmin_w ||Z w - y||^2 + ridge ||w||^2 (minimum-norm when ridge = 0 and Z is deficient)."""
    G = Z.T @ Z
    b = Z.T @ y
    k = G.shape[0]
    scale = float(G.diagonal().abs().max()) if k else 0.0
    if ridge > 0:
        G = G + ridge * torch.eye(k, dtype=G.dtype, device=G.device)
    L, info = torch.linalg.cholesky_ex(G)
    if int(info) == 0 and scale > 0:
        # reject near-singular systems: their Cholesky succeeds but the solve is noise
        dmin = float(L.diagonal().min()) ** 2
        if dmin > 1e-12 * scale:
            return torch.cholesky_solve(b[:, None], L)[:, 0]
    if ridge > 0:
        return torch.linalg.solve(G, b)
    return torch.linalg.lstsq(Z.cpu(), y.cpu()[:, None], driver="gelsd").solution[:, 0].to(Z.device)


def _mode_product(X: Tensor, U: Tensor, axis: int) -> Tensor:
    """Contract axis `axis` of X (size p) with U (p, r); the r axis takes its place."""
    return torch.movedim(torch.tensordot(X, U, dims=([axis], [0])), -1, axis)


# ----------------------------------------------------------------------------- base
class _ALSRegressor(EstimatorParams):
    """Shared fit/predict/score; subclasses define _init, _sweep, _coef and degrees_of_freedom."""

    _min_modes: int  # defined by each model (CPRegressor, TuckerRegressor)

    def __init__(self, ridge=0.0, n_iter_max=200, tol=1e-8, init="moment", fit_intercept=False, random_state=None):
        self.ridge = ridge
        self.n_iter_max = n_iter_max
        self.tol = tol
        self.init = init
        self.fit_intercept = fit_intercept
        self.random_state = random_state

    # the model's hooks
    def _check_ranks(self, dims):
        raise NotImplementedError

    def _df(self, dims) -> int:
        raise NotImplementedError

    def _init_factors(self, X, y, gen):
        raise NotImplementedError

    def _predict_centered(self, X):
        raise NotImplementedError

    def _sweep(self, X, y) -> float:
        raise NotImplementedError

    def _coef(self):
        raise NotImplementedError

    def _validate(self, X, y):
        check_fit_settings(self.ridge, self.n_iter_max, self.tol, self.init)
        if not isinstance(self.fit_intercept, bool):
            raise ValueError(f"fit_intercept: expected a bool, got {self.fit_intercept!r}")
        return check_Xy(X, y, min_modes=self._min_modes)

    def fit(self, X, y):
        """Fit by ALS. X: (n, p_1, ..., p_D), y: (n,). Returns self."""
        Xt, yt = self._validate(X, y)
        return self._fit(Xt, yt)

    def _fit(self, Xt, yt):
        self._check_ranks(tuple(Xt.shape[1:]))
        gen = as_generator(self.random_state)
        if self.fit_intercept:
            x_mean, y_mean = Xt.mean(0), yt.mean()
            Xc, yc = Xt - x_mean, yt - y_mean
        else:
            x_mean, y_mean = None, torch.zeros((), dtype=torch.float64)
            Xc, yc = Xt, yt
        self._init_factors(Xc, yc, gen)
        y_norm2 = float(yc @ yc)
        rss = float(((yc - self._predict_centered(Xc)) ** 2).sum())
        history = [rss]
        it = 0
        converged = False
        for it in range(1, self.n_iter_max + 1):  # noqa: B007 (read after the loop: iterations run)
            # the sweep returns the RSS of its last block update (no extra contraction of X)
            rss = self._sweep(Xc, yc)
            history.append(rss)
            prev = history[-2]
            if rss <= 1e-28 * max(y_norm2, 1e-300) or abs(prev - rss) <= self.tol * max(prev, 1e-300):
                converged = True
                break
        self.n_iter_ = it
        self.converged_ = converged
        self.rss_history_ = history
        self.coef_ = self._coef()
        self._prep_cache = None
        self.intercept_ = float(y_mean - (self.coef_ * x_mean).sum()) if self.fit_intercept else 0.0
        self.n_features_in_ = tuple(Xt.shape[1:])
        self.n_samples_ = int(Xt.shape[0])
        self.rss_ = float(((yt - self._linear(Xt)) ** 2).sum())
        self.train_error_ = self.rss_ / self.n_samples_
        return self

    def _linear(self, Xt):
        return Xt.flatten(1) @ self.coef_.flatten() + self.intercept_

    def _check_fitted(self):
        if not hasattr(self, "coef_"):
            raise RuntimeError(f"{type(self).__name__}: call fit(X, y) before predict/score")

    def predict(self, X):
        """<coef_, X_i> + intercept_ for each sample; numpy in, numpy out; tensor in, tensor out."""
        self._check_fitted()
        Xt = check_Xy(X, min_modes=self._min_modes)
        if tuple(Xt.shape[1:]) != self.n_features_in_:
            raise ValueError(
                f"X: expected samples of shape {self.n_features_in_} (as in fit), got {tuple(Xt.shape[1:])}"
            )
        out = self._linear(Xt.to(self.coef_.device))
        if isinstance(X, Tensor):
            return out.to(X.dtype if X.is_floating_point() else torch.float64)
        return out.cpu().numpy()

    def score(self, X, y):
        """Coefficient of determination R^2 of the prediction."""
        Xt, yt = check_Xy(X, y, min_modes=self._min_modes)
        pred = torch.as_tensor(self.predict(Xt), dtype=torch.float64)
        ss_res = float(((yt - pred) ** 2).sum())
        ss_tot = float(((yt - yt.mean()) ** 2).sum())
        return 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res == 0 else 0.0)

    def centered(self, X, y):
        """(X, y) as the fit saw them (centered with the training means when fit_intercept)."""
        self._check_fitted()
        Xt, yt = check_Xy(X, y, min_modes=self._min_modes)
        if self.fit_intercept:
            Xt = Xt - Xt.mean(0)
            yt = yt - yt.mean()
        return Xt, yt

    def degrees_of_freedom_for(self, dims) -> int:
        return self._df(tuple(dims)) + (1 if self.fit_intercept else 0)

    @property
    def degrees_of_freedom(self) -> int:
        """Dimension of the fitted model's parameter manifold (+1 with an intercept)."""
        self._check_fitted()
        return self.degrees_of_freedom_for(self.n_features_in_)


def _moment_estimate(X: Tensor, y: Tensor) -> Tensor:
    """(1/n) sum_i y_i X_i: unbiased for B when X has i.i.d. N(0, 1) entries."""
    return torch.tensordot(y, X, dims=([0], [0])) / X.shape[0]


def _leading_vectors(B: Tensor, mode: int, rank: int, gen) -> Tensor:
    p = B.shape[mode]
    k = min(rank, p)
    unf = torch.movedim(B, mode, 0).reshape(p, -1)
    if float(unf.abs().max()) == 0:
        U = torch.zeros(p, 0, dtype=B.dtype)
    else:
        U = truncated_svd(unf, rank=k, method="lapack").U
    if U.shape[1] < rank:
        extra = torch.randn(p, rank - U.shape[1], dtype=B.dtype, generator=gen)
        U = torch.cat([U, extra / extra.norm(dim=0, keepdim=True)], 1)
    return U


# ----------------------------------------------------------------------------- CP
class CPRegressor(_ALSRegressor):
    """Scalar-on-tensor regression with a rank-R CP coefficient tensor
    B = sum_r a^(1)_r o a^(2)_r o ... o a^(D)_r, fitted by ALS.

    Args:
        rank: R >= 1.
        ridge: lambda >= 0; each block update minimizes ||y - Z_d vec(A_d)||^2 + lambda ||A_d||^2.
        n_iter_max: ALS sweeps at most.
        tol: stop when the residual sum of squares changes by less than tol (relative).
        init: "moment" (factors from the SVDs of the unfoldings of (1/n) sum_i y_i X_i) or
           "random".
        fit_intercept: fit b0 too (centers X and y; adds one degree of freedom).
        random_state: None, an int seed or a torch.Generator (random init, padding columns).
    Fitted attributes: factors_ (list of (p_d, R)), coef_ (B, (p_1..p_D)), intercept_, rss_,
        train_error_ (RSS/n), n_iter_, converged_, rss_history_.
    """

    _min_modes = 1

    def __init__(
        self, rank=1, ridge=0.0, n_iter_max=200, tol=1e-8, init="moment", fit_intercept=False, random_state=None
    ):
        super().__init__(ridge, n_iter_max, tol, init, fit_intercept, random_state)
        self.rank = rank

    def _check_ranks(self, dims):
        _check_rank(self.rank, "rank")

    def _df(self, dims):
        return cp_degrees_of_freedom(_check_rank(self.rank, "rank"), dims)

    def _init_factors(self, X, y, gen):
        R, dims = int(self.rank), X.shape[1:]
        if self.init == "random":
            self.factors_ = [torch.randn(p, R, dtype=torch.float64, generator=gen) / math.sqrt(p) for p in dims]
        else:
            B0 = _moment_estimate(X, y)
            self.factors_ = [_leading_vectors(B0, d, R, gen) for d in range(len(dims))]
        self.factors_ = [f.to(X.device) for f in self.factors_]

    def _unfoldings(self, X: Tensor) -> list:
        """For each mode d, X unfolded as (n p_d, prod of the other p) with the other modes in
        order: every partial product is then one GEMM with their Khatri-Rao product. Mode 0's
        is a view; the others are copies, made once per fit (not at every sweep)."""
        key = (X.data_ptr(), tuple(X.shape))
        cache = getattr(self, "_prep_cache", None)
        if cache is None or cache[0] != key:
            n, dims = X.shape[0], X.shape[1:]
            unf = [torch.movedim(X, d + 1, 1).reshape(n * p, -1) for d, p in enumerate(dims)]
            self._prep_cache = cache = (key, X, unf)  # X held: its address cannot be reused meanwhile
        return cache[2]

    def _partial(self, X: Tensor, skip: int) -> Tensor:
        """Z (n, p_skip, R): X_i contracted with a^(k)_r on every mode k != skip (the MTTKRP)."""
        A = self.factors_
        R = A[0].shape[1]
        if X.dim() == 2:
            return X[:, :, None].expand(-1, -1, R)
        others = [A[k] for k in range(len(A)) if k != skip]
        khatri_rao = others[0]
        for a in others[1:]:  # rows: the other modes' indices, first most significant
            khatri_rao = (khatri_rao[:, None, :] * a[None, :, :]).reshape(-1, R)
        return (self._unfoldings(X)[skip] @ khatri_rao).reshape(X.shape[0], X.shape[skip + 1], R)

    def _predict_centered(self, X):
        last = X.dim() - 2
        return (self._partial(X, last) * self.factors_[last]).sum((1, 2))

    def _sweep(self, X, y) -> float:
        D = X.dim() - 1
        for d in range(D):
            Z = self._partial(X, d).reshape(X.shape[0], -1)  # (n, p_d R)
            w = _lstsq(Z, y, float(self.ridge))
            if d == D - 1:
                rss = float(((y - Z @ w) ** 2).sum())  # B after the sweep (rescaling keeps it)
            self.factors_[d] = w.reshape(self.factors_[d].shape)
            if D > 1:
                # keep the scale on the factor updated next: unit columns elsewhere
                norms = self.factors_[d].norm(dim=0)
                safe = torch.where(norms > 0, norms, torch.ones_like(norms))
                self.factors_[d] = self.factors_[d] / safe
                nxt = (d + 1) % D
                self.factors_[nxt] = self.factors_[nxt] * safe
        return rss

    def _coef(self):
        return _cp_tensor(self.factors_)

    # the fitted point as a flat parameter vector, for `tensorpress.rank.stein`
    def _param_vector(self) -> Tensor:
        return torch.cat([f.flatten() for f in self.factors_])

    def _coef_of(self, theta: Tensor) -> Tensor:
        sizes = [f.numel() for f in self.factors_]
        return _cp_tensor([t.reshape(f.shape) for t, f in zip(torch.split(theta, sizes), self.factors_)])

    def _jacobian(self, X: Tensor) -> Tensor:
        """d(predictions)/d(parameters) (n, P) at the fit: the ALS design matrices side by side."""
        jac = torch.cat([self._partial(X, d).reshape(X.shape[0], -1) for d in range(X.dim() - 1)], 1)
        self._prep_cache = None  # the unfoldings are copies of X: not kept
        return jac

    def _coef_hessian(self, E: Tensor) -> Tensor:
        """Hessian (P, P) of theta -> <E, B(theta)> at the fit, in closed form: B is linear in
        each factor, so only blocks of two different modes d != e and the same component r
        are nonzero, E contracted with a^(f)_r on every other mode f."""
        A = self.factors_
        D, R = len(A), A[0].shape[1]
        sizes = [a.shape[0] * R for a in A]
        offs = [sum(sizes[:d]) for d in range(D)]
        H = torch.zeros(sum(sizes), sum(sizes), dtype=E.dtype, device=E.device)
        letters = "abcdefghijklmnopq"[:D]
        for d in range(D):
            for e in range(d + 1, D):
                others = [f for f in range(D) if f not in (d, e)]
                spec = letters + "".join(f",{letters[f]}r" for f in others) + f"->{letters[d]}{letters[e]}r"
                T = (
                    torch.einsum(spec, E, *[A[f] for f in others]) if others else E[:, :, None].expand(-1, -1, R)
                )  # (p_d, p_e, R)
                blk = torch.diag_embed(T).permute(0, 2, 1, 3).reshape(sizes[d], sizes[e])
                H[offs[d] : offs[d] + sizes[d], offs[e] : offs[e] + sizes[e]] = blk
                H[offs[e] : offs[e] + sizes[e], offs[d] : offs[d] + sizes[d]] = blk.T
        return H


def _cp_tensor(factors) -> Tensor:
    B = factors[0]  # (p_1, R)
    for f in factors[1:]:
        B = (B[..., None, :] * f).reshape(*B.shape[:-1], f.shape[0], f.shape[1])
    return B.sum(-1)


class LowRankRegressor(CPRegressor):
    """Scalar-on-matrix regression y = <B, X> + eps with rank(B) <= R (X: (n, p, q)).

    Started from the truncated SVD (`tensorpress.linalg.truncated_svd`) of the ridge/least-
    squares estimate of B (the moment estimate when n < p*q) and refined by ALS on B = U V^T,
    so the fit is the rank-R least-squares fit, not just a truncation. df = R(p + q - R).
    Same arguments as CPRegressor.
    """

    _min_modes = 2

    def _check_ranks(self, dims):
        if len(dims) != 2:
            raise ValueError(f"X: LowRankRegressor expects matrix samples (n, p, q), got sample shape {dims}")
        _check_rank(self.rank, "rank")

    def _init_factors(self, X, y, gen):
        if self.init == "random":
            return super()._init_factors(X, y, gen)
        n, p, q = X.shape
        R = int(self.rank)
        if n > p * q or self.ridge > 0:
            B0 = _lstsq(X.reshape(n, p * q), y, float(self.ridge)).reshape(p, q)
        else:
            B0 = _moment_estimate(X, y)
        k = min(R, p, q)
        U, S, Vh = truncated_svd(B0, rank=k, method="lapack")
        U = U * S
        V = Vh.T
        if k < R:
            U = torch.cat([U, torch.zeros(p, R - k, dtype=U.dtype)], 1)
            V = torch.cat([V, torch.randn(q, R - k, dtype=V.dtype, generator=gen)], 1)
        # ALS starts by updating mode 0 (U), so the start is carried by V
        self.factors_ = [U, V]


# ----------------------------------------------------------------------------- Tucker
class TuckerRegressor(_ALSRegressor):
    """Scalar-on-tensor regression with a Tucker coefficient tensor
    B = G x_1 U_1 x_2 U_2 ... x_D U_D, G (R_1..R_D), U_d (p_d, R_d), fitted by ALS (one
    least-squares update per factor, then the core; each factor is re-orthonormalized by QR
    and its triangular part pushed into the core, which leaves B unchanged).

    Args:
        ranks: an int (same for every mode) or one int per mode, 1 <= R_d <= p_d.
        other arguments as CPRegressor (init "moment" is the HOSVD of (1/n) sum_i y_i X_i).
    Fitted attributes: core_, factors_, coef_, intercept_, rss_, train_error_, n_iter_, ...
    """

    _min_modes = 1

    def __init__(
        self, ranks=1, ridge=0.0, n_iter_max=200, tol=1e-8, init="moment", fit_intercept=False, random_state=None
    ):
        super().__init__(ridge, n_iter_max, tol, init, fit_intercept, random_state)
        self.ranks = ranks

    def _check_ranks(self, dims):
        ranks = _tucker_ranks(self.ranks, len(dims))
        if any(r > p for r, p in zip(ranks, dims)):
            raise ValueError(f"ranks: expected R_d <= p_d for samples of shape {dims}, got {ranks}")
        return ranks

    def _df(self, dims):
        return tucker_degrees_of_freedom(self._check_ranks(dims), dims)

    def _init_factors(self, X, y, gen):
        dims = tuple(X.shape[1:])
        ranks = self._check_ranks(dims)
        if self.init == "random":
            U = [torch.linalg.qr(torch.randn(p, r, dtype=torch.float64, generator=gen))[0] for p, r in zip(dims, ranks)]
        else:
            B0 = _moment_estimate(X, y)
            U = [_leading_vectors(B0, d, r, gen) for d, r in enumerate(ranks)]
            U = [torch.linalg.qr(u)[0] for u in U]
        self.factors_ = [u.to(X.device) for u in U]
        self.core_ = torch.zeros(ranks, dtype=torch.float64, device=X.device)
        self._update_core(X, y)

    def _project(self, X, skip=None):
        T = X
        for k, U in enumerate(self.factors_):
            if k != skip:
                T = _mode_product(T, U, k + 1)
        return T

    def _update_core(self, X, y) -> float:
        W = self._project(X).reshape(X.shape[0], -1)
        g = _lstsq(W, y, float(self.ridge))
        self.core_ = g.reshape(self.core_.shape)
        return float(((y - W @ g) ** 2).sum())

    def _predict_centered(self, X):
        return self._project(X).reshape(X.shape[0], -1) @ self.core_.flatten()

    def _factor_design(self, X, d) -> Tensor:
        """Z (n, p_d, R_d): predictions are linear in U_d with these coefficients."""
        n = X.shape[0]
        W = self._project(X, skip=d)  # (n, R_1.., p_d, ..R_D)
        G = self.core_
        # Z[i, a, s] = sum_{others} W[i, .., a, ..] G[.., s, ..]
        Wd = torch.movedim(W, d + 1, -1).reshape(n, -1, W.shape[d + 1])  # (n, prod R_-d, p_d)
        Gd = torch.movedim(G, d, -1).reshape(-1, G.shape[d])  # (prod R_-d, R_d)
        return torch.einsum("nka,ks->nas", Wd, Gd)

    def _sweep(self, X, y) -> float:
        D = X.dim() - 1
        n = X.shape[0]
        for d in range(D):
            Z = self._factor_design(X, d)
            p, r = Z.shape[1], Z.shape[2]
            U = _lstsq(Z.reshape(n, p * r), y, float(self.ridge)).reshape(p, r)
            Q, Rq = torch.linalg.qr(U)
            self.factors_[d] = Q
            self.core_ = _mode_product(self.core_, Rq.T, d)  # G x_d Rq
        return self._update_core(X, y)

    def _coef(self):
        return _tucker_tensor(self.core_, self.factors_)

    # the fitted point as a flat parameter vector (core, then factors), for `tensorpress.rank.stein`
    def _param_vector(self) -> Tensor:
        return torch.cat([self.core_.flatten()] + [u.flatten() for u in self.factors_])

    def _coef_of(self, theta: Tensor) -> Tensor:
        parts = [self.core_] + list(self.factors_)
        t = torch.split(theta, [a.numel() for a in parts])
        return _tucker_tensor(t[0].reshape(self.core_.shape), [u.reshape(f.shape) for u, f in zip(t[1:], parts[1:])])

    def _jacobian(self, X: Tensor) -> Tensor:
        """d(predictions)/d(core, factors) (n, P) at the fit."""
        n = X.shape[0]
        blocks = [self._project(X).reshape(n, -1)]
        blocks += [self._factor_design(X, d).reshape(n, -1) for d in range(X.dim() - 1)]
        return torch.cat(blocks, 1)


def _tucker_tensor(core: Tensor, factors) -> Tensor:
    B = core
    for k, U in enumerate(factors):
        B = _mode_product(B, U.T, k)
    return B
