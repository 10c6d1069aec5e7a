"""The closed-form block updates of tenBCD (Li, Chung, Du, Wang, Zhou and Shen,
arXiv 2303.06815), as plain functions.

Convention: samples are columns. ``V`` (d_{i-1} x n) is a layer's input, ``U = W V`` (d_i x n)
its pre-activation, ``W`` (d_i x d_{i-1}) its weight. Every function returns the exact
minimizer of the objective F (see :func:`tensorpress.train.tenbcd.TenBCD.objective`) over its
block, plus the proximal term (alpha/2)||X - X_old||^2 where the method asks for one. The linear
systems are symmetric positive definite and solved by Cholesky; when the other dimension of a
Gram matrix is smaller, by the Woodbury identity on the smaller system.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from tensorpress.linalg import blas


class SolveError(RuntimeError):
    """A Cholesky factorization failed (matrix not numerically positive definite)."""


def cholesky(A: Tensor, what: str) -> Tensor:
    """Lower Cholesky factor of the SPD matrix A; SolveError naming `what` if it fails."""
    L, info = torch.linalg.cholesky_ex(A)
    if int(info.max()) != 0:
        raise SolveError(
            f"{what}: Cholesky factorization failed (matrix not positive definite; "
            "non-finite values or too small gamma/alpha/tau?)"
        )
    return L


def _add_diag(A: Tensor, c: float) -> Tensor:
    A.diagonal().add_(c)
    return A


# ----------------------------------------------------------------------------- output layer
def update_v_out(Y: Tensor, U: Tensor, V: Tensor, gamma: float, alpha: float) -> Tensor:
    """V_N <- argmin 1/2||V - Y||^2 + gamma/2||V - U_N||^2 + alpha/2||V - V_N||^2."""
    return (Y + gamma * U + alpha * V) / (1.0 + gamma + alpha)


def update_u_out(V: Tensor, P: Tensor, gamma: float, rho: float) -> Tensor:
    """U_N <- argmin gamma/2||V_N - U||^2 + rho/2||U - P||^2 with P = W_N V_{N-1}."""
    return (gamma * V + rho * P) / (gamma + rho)


# ----------------------------------------------------------------------------- hidden layers
def relu_prox(V: Tensor, B: Tensor, g: float) -> Tensor:
    """Elementwise argmin_u (ReLU(u) - V)^2 + g (u - B)^2, by cases on the sign of u.

    u >= 0: u1 = max(s, 0), s = (V + g B) / (1 + g), cost (u1 - V)^2 + g (u1 - B)^2;
    u <= 0: u2 = min(B, 0), cost V^2 + g (u2 - B)^2. The cheaper one wins (u1 on ties).
    Comparing the two costs in closed form: B >= 0: u2 = 0 is u1's candidate too, so u1 wins;
    B < 0, s <= 0: u1 = 0 costs g B^2 more than u2 = B; B < 0, s > 0: u1 = s costs
    g (V - B)^2 / (1 + g) against V^2, i.e. u1 wins iff sqrt(g) (V - B) <= sqrt(1 + g) V, which
    is linear: (sqrt(1 + g) - sqrt(g)) V + sqrt(g) B >= 0 (and it implies s > 0 when B < 0). So
    u = max(s, 0) where B >= 0 or that holds, else B: seven passes over the data.
    """
    s = torch.lerp(V, B, g / (1.0 + g))
    c = math.sqrt(1.0 + g) - math.sqrt(g)
    s_wins = torch.add(B, V, alpha=c / math.sqrt(g)) >= 0
    s_wins |= B >= 0
    return torch.where(s_wins, s.clamp_min_(0.0), B)


def update_u_hidden(V: Tensor, P: Tensor, U: Tensor, gamma: float, rho: float, alpha: float) -> Tensor:
    """U_i <- argmin gamma/2||V_i - ReLU(U)||^2 + rho/2||U - P||^2 + alpha/2||U - U_i||^2, P = W_i V_{i-1}.

    The two quadratics merge into (rho + alpha)/2 ||U - B||^2, B = (rho P + alpha U_i)/(rho + alpha);
    dividing by gamma/2 gives relu_prox with g = (rho + alpha)/gamma.
    """
    B = torch.lerp(U, P, rho / (rho + alpha)) if alpha else P
    return relu_prox(V, B, (rho + alpha) / gamma)


def update_v_hidden(
    W_next: Tensor, U_next: Tensor, R: Tensor, gamma: float, rho: float, with_product: bool = False
) -> Tensor | tuple[Tensor, Tensor]:
    """V_i <- (rho W^T W + gamma I)^{-1} (rho W^T U_{i+1} + gamma R), W = W_{i+1}, R = ReLU(U_i).

    The exact minimizer of gamma/2||V - R||^2 + rho/2||U_{i+1} - W V||^2. When W has fewer rows
    (m) than columns (d), Woodbury: (gamma I + rho W^T W)^{-1} = (I - W^T S^{-1} W)/gamma with
    S = gamma/rho I + W W^T, so only an m x m system is factorized; with Z = rho W^T U + gamma R,
    V = (Z - W^T S^{-1} W Z)/gamma = R + W^T (rho U - S^{-1} W Z)/gamma and W Z = gamma W R +
    rho S U - gamma U: two d x n products (W R and W^T (...)) instead of the three of forming Z.
    with_product: also return W V (the next layer's product, for the caller's cache), which the
    Woodbury path gets from the same terms: W V = W R + (S M)/gamma - M/rho, M = rho U - S^{-1} W Z.
    R and V may share a (non-contiguous) layout: R is (d x n) or (d*g x n) viewed accordingly.
    """
    m, d = W_next.shape
    if m < d:
        S = _add_diag(gram(W_next), gamma / rho)
        L = cholesky(S, "V update (Woodbury system gamma/rho I + W W^T)")
        WR = blas.mm(W_next, R)
        WZ = blas.addmm(WR, S, U_next, beta=gamma, alpha=rho).sub_(U_next, alpha=gamma)
        M = _solve_left(WZ, L).mul_(-1.0).add_(U_next, alpha=rho)  # rho U - S^{-1} W Z
        V = blas.addmm(R, W_next.T, M, alpha=1.0 / gamma)
        if not with_product:
            return V
        return V, blas.addmm(WR, S, M, alpha=1.0 / gamma).sub_(M, alpha=1.0 / rho)
    Z = blas.addmm(R, W_next.T, U_next, beta=gamma, alpha=rho)  # rho W^T U + gamma R
    L = cholesky(_add_diag(gram(W_next.T, rho, lower=True), gamma), "V update (rho W^T W + gamma I)")
    # A^{-1} Z = (Z^T A^{-1})^T: right-side solves are the fast ones; made row-major again so
    # the V (and the U computed from it) keep the layout the layer views expect
    V = _solve_right(Z.T, L).T.contiguous()
    return (V, blas.mm(W_next, V)) if with_product else V


GRAM_BLOCKED_MIN = 512  # below this the half-size products are no faster than one


def gram(A: Tensor, scale: float = 1.0, lower: bool = False) -> Tensor:
    """scale * A A^T (A: d x n). From d = 512 on, by 2 x 2 blocks, recursively: the off-diagonal
    block computed once, the diagonal ones by the same rule, so the products cost about d^2 n
    multiply-adds instead of the 2 d^2 n of A @ A.T (BLAS's GEMM does not use the symmetry).
    lower: only the lower triangle is wanted (a Cholesky factorization reads no other): the
    upper one is left zero wherever a block was split, which saves the mirroring copies."""
    d = A.shape[0]
    if d < GRAM_BLOCKED_MIN:
        return blas.mm(A, A.T).mul_(scale)
    out = A.new_zeros(d, d) if lower else A.new_empty(d, d)
    _gram_into(A, out, mirror=not lower)
    return out.mul_(scale) if scale != 1.0 else out


def _gram_into(A: Tensor, out: Tensor, mirror: bool) -> None:
    d = A.shape[0]
    if d < GRAM_BLOCKED_MIN:
        out.copy_(blas.mm(A, A.T))
        return
    h = d // 2
    top, bottom = A[:h], A[h:]
    _gram_into(top, out[:h, :h], mirror)
    _gram_into(bottom, out[h:, h:], mirror)
    off = blas.mm(bottom, top.T)
    out[h:, :h] = off
    if mirror:
        out[:h, h:] = off.T


@dataclass
class GramFactor:
    """A Cholesky factor of the W-update system for one layer input V (d x n).

    direct: L L^T = c I + rho V V^T (d x d). woodbury: L L^T = c/rho I + V^T V (n x n), used when n < d.
    Reusable as long as V and c = alpha + tau do not change (the first layer's input X).
    """

    L: Tensor
    woodbury: bool
    c: float


def gram_factor(Vp: Tensor, rho: float, c: float) -> GramFactor:
    """Factorize the W-update system of input Vp (d x n) with diagonal weight c = alpha + tau."""
    d, n = Vp.shape
    if n < d and c > 0:
        return GramFactor(
            cholesky(_add_diag(gram(Vp.T, lower=True), c / rho), "W update (Woodbury system c/rho I + V^T V)"), True, c
        )
    return GramFactor(cholesky(_add_diag(gram(Vp, rho, lower=True), c), "W update (c I + rho V V^T)"), False, c)


def update_w(
    W: Tensor,
    U: Tensor,
    Vp: Tensor,
    rho: float,
    alpha: float,
    tau: float = 0.0,
    target: Tensor | None = None,
    factor: GramFactor | None = None,
    decay: float = 0.0,
) -> Tensor:
    """W_i <- (alpha W_i + tau T + rho U V^T) ((alpha + tau + decay) I + rho V V^T)^{-1}, V = V_{i-1}, T = target.

    The exact minimizer of rho/2||U - W V||^2 + tau/2||W - T||^2 + alpha/2||W - W_i||^2 + decay/2||W||^2.
    `factor` (from gram_factor(Vp, rho, alpha + tau + decay)) is reused when given.
    """
    c = alpha + tau + decay
    if factor is not None and factor.c != c:
        raise ValueError(f"factor: built for alpha + tau + decay = {factor.c}, this update needs {c}")
    if factor is None:
        factor = gram_factor(Vp, rho, c)
    R = blas.mm(U, Vp.T)
    R.mul_(rho)
    if alpha:
        R.add_(W, alpha=alpha)
    if tau and target is not None:
        R.add_(target, alpha=tau)
    if factor.woodbury:
        # W = (R - (R V) S^{-1} V^T) / c with S = c/rho I + V^T V
        T = _solve_right(blas.mm(R, Vp), factor.L)
        return blas.addmm(R, T, Vp.T, alpha=-1.0).div_(c)
    return _solve_right(R, factor.L)


def _solve_right(B: Tensor, L: Tensor) -> Tensor:
    """B (L L^T)^{-1} by two triangular solves from the right (no transposed copies of B, as
    cholesky_solve on B^T would make: about 15% faster for the 1024 x 1024 W updates). A B of
    few rows (the output layer's W) is solved from the left as (L L^T)^{-1} B^T instead: torch's
    right-side solve copies L, 7x the time of the solve itself at 10 x 1024. The solves run on
    the extension's OpenBLAS where they can (`linalg.blas`: 2-3x torch's on this CPU)."""
    if B.shape[0] < FEW_ROWS:
        return _solve_left(B.mT, L).mT
    X = blas.solve_triangular(L.mT, B, upper=True, left=False)
    return blas.solve_triangular(L, X, upper=False, left=False)


def _solve_left(B: Tensor, L: Tensor) -> Tensor:
    """(L L^T)^{-1} B by two triangular solves (what torch.cholesky_solve computes)."""
    return blas.solve_triangular(L.mT, blas.solve_triangular(L, B, upper=False), upper=True)


FEW_ROWS = 64
