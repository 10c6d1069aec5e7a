r"""Data-aware Tucker-2 and CP fits of a Conv2d.

A conv is a linear layer on its input patches: y = W_mat p + b with W_mat = weight.reshape(out,
in * kh * kw) and p the (in, kh, kw) patch an output position sees (see
:func:`tensorpress.nn.patches.conv_patches`). The calibration statistics are the Grams
of those patches, and the objective is the low-rank fits' one with W^ a Tucker-2 or CP kernel:

    min || P W_mat^T + 1 b^T - P~ W^_mat^T - 1 b^^T ||_F^2 = tr(W^ G W^^T) - 2 tr(W^ Q) + const.

The kernel is multilinear in its factors (Tucker-2: U_out, core, U_in; CP: A, B, C, D), so
with all factors but one fixed the objective is a least-squares problem in that factor. The
fit starts from the weights-only decomposition (HOSVD/HOOI or CP-ALS, what ``from_dense``
does) and runs ALS sweeps over the factors, each update solved by conjugate gradients from the
current factor (matrix-free; the products go through autograd's vector-Jacobian product of
the kernel map, which is linear in the factor being updated), so every update lowers the
objective. With one-shot statistics (X~ = X) it is the "whitened" method. The output-side
factor's update is the "data-aware output projection": with the other factors fixed it is
the least-squares map from the compressed layer's inner channels to the original outputs.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import Tensor, nn

from tensorpress.compress.lowrank import DEFAULT_RIDGE, small_problem_threads
from tensorpress.compress.quadratic import OutputObjective, conjugate_gradient
from tensorpress.compress.stats import GramStats
from tensorpress.nn.cp_conv2d import CPConv2d
from tensorpress.nn.tucker_conv2d import TuckerConv2d

DEFAULT_SWEEPS = 3
DEFAULT_CG_ITERS = 25


@dataclass
class ConvFit:
    """A compressed conv (float64 factors inside ``module``), its bias and diagnostics."""

    module: nn.Module
    bias: Tensor | None
    info: dict = field(default_factory=dict)

    def weight(self) -> Tensor:
        """The dense kernel as an (out, in * kh * kw) matrix."""
        w = cast("CPConv2d | TuckerConv2d", self.module).to_dense().detach().to(torch.float64)
        return w.reshape(w.shape[0], -1)


def refine_factors(
    factors: list[Tensor],
    kernel: Callable[..., Tensor],
    stats: GramStats,
    weight: Tensor,
    sweeps: int,
    cg_iters: int,
    ridge: float,
) -> tuple[list[Tensor], list[float], float]:
    """ALS sweeps over ``factors`` of the multilinear ``kernel(*factors) -> (out, features)``
    on the data-aware objective. Returns (factors, objective history, output energy)."""
    objective = OutputObjective(weight.reshape(weight.shape[0], -1), stats, ridge)
    factors = [f.detach().to(torch.float64).clone() for f in factors]
    history = [objective(kernel(*factors))]
    for _ in range(sweeps):
        for k in range(len(factors)):

            def linear(x, k=k):
                return kernel(*factors[:k], x, *factors[k + 1 :])

            adjoint = torch.func.vjp(linear, factors[k])[1]  # linear in x: valid at any point
            rhs = adjoint(objective.target)[0]
            factors[k] = conjugate_gradient(
                lambda g, adjoint=adjoint, linear=linear: adjoint(objective.apply(linear(g)))[0],
                rhs,
                factors[k],
                cg_iters,
            )
            history.append(objective(kernel(*factors)))
    return factors, history, objective.energy


def _fit_factored(
    conv: nn.Conv2d,
    module: nn.Module,
    stats: GramStats | None,
    kernel: Callable[..., Tensor],
    views: list[Tensor],
    sweeps: int,
    cg_iters: int,
    ridge: float,
) -> ConvFit:
    """``module`` (float64, from the weights-only decomposition) refined on the data: ``views``
    are its factors as views into its parameters (written back in place), ``kernel`` maps them
    to the (out, in * kh * kw) kernel matrix."""
    if stats is None:
        return ConvFit(module, None if conv.bias is None else _bias(module).detach().clone(), {"method": "svd"})
    with small_problem_threads(views[0].device, min(conv.out_channels, conv.in_channels)):
        factors, history, energy = refine_factors(
            views, kernel, stats, conv.weight.to(torch.float64), sweeps, cg_iters, ridge
        )
    with torch.no_grad():
        for view, factor in zip(views, factors):
            view.copy_(factor)
    module = _with_bias(conv, module)
    bias = _free_bias(conv, kernel(*factors), stats)
    with torch.no_grad():
        _bias(module).copy_(bias)
    info = {"method": "activation" if stats.paired else "whitened", "objective": history, "output_energy": energy}
    return ConvFit(module, bias, info)


def _free_bias(conv: nn.Conv2d, w_hat: Tensor, stats: GramStats) -> Tensor:
    """b^ = b + W mu - W^ mu~ (the least-squares bias for the fitted kernel)."""
    w = conv.weight.detach().to(torch.float64).reshape(conv.out_channels, -1)
    b = w @ stats.mean_ref - w_hat @ stats.mean_in
    return b if conv.bias is None else b + conv.bias.detach().to(torch.float64)


def _check_stats(conv: nn.Conv2d, stats: GramStats | None) -> None:
    features = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
    if stats is not None and stats.in_features != features:
        raise ValueError(
            f"stats: expected patch statistics of {features} features (in_channels * kh * kw), got {stats.in_features}"
        )


def _bias(module: nn.Module) -> Tensor:
    """The bias parameter of a factored conv (nn.Module's attribute type is too loose for mypy)."""
    return cast(Tensor, module.bias)


def _with_bias(conv: nn.Conv2d, module: nn.Module) -> nn.Module:
    """The fits leave the bias free: give the module one even when the conv had none."""
    if module.bias is None:
        module.bias = nn.Parameter(torch.zeros(conv.out_channels, dtype=torch.float64))
    return module


def fit_tucker_conv(
    conv: nn.Conv2d,
    stats: GramStats | None,
    ranks: Sequence[int] | int,
    sweeps: int = DEFAULT_SWEEPS,
    cg_iters: int = DEFAULT_CG_ITERS,
    ridge: float = DEFAULT_RIDGE,
) -> ConvFit:
    """Tucker-2 (r_out, r_in) of ``conv``: HOOI of the kernel, then (with statistics) ALS on
    the data-aware objective over U_out, the core and U_in."""
    _check_stats(conv, stats)
    module = TuckerConv2d.from_dense(_as_float64_conv(conv), ranks).to(torch.float64)

    def kernel(last, core, first):
        return torch.einsum("oa,abhw,bi->oihw", last, core, first).reshape(last.shape[0], -1)

    views = [module.last[:, :, 0, 0], module.core, module.first[:, :, 0, 0]]
    return _fit_factored(conv, module, stats, kernel, views, sweeps, cg_iters, ridge)


def fit_cp_conv(
    conv: nn.Conv2d,
    stats: GramStats | None,
    rank: int,
    decomposition: str = "als",
    sweeps: int = DEFAULT_SWEEPS,
    cg_iters: int = DEFAULT_CG_ITERS,
    ridge: float = DEFAULT_RIDGE,
) -> ConvFit:
    """Rank-R CP of ``conv``: CP-ALS (or ``decomposition="overparam"``) of the kernel, then (with
    statistics) ALS on the data-aware objective over the four factors."""
    _check_stats(conv, stats)
    module = CPConv2d.from_dense(_as_float64_conv(conv), rank, method=decomposition).to(torch.float64)

    def kernel(a, b, c, d):
        return torch.einsum("or,ri,rh,rw->oihw", a, b, c, d).reshape(a.shape[0], -1)

    views = [
        module.pointwise_out[:, :, 0, 0],
        module.pointwise_in[:, :, 0, 0],
        module.depthwise_h[:, 0, :, 0],
        module.depthwise_w[:, 0, 0, :],
    ]
    return _fit_factored(conv, module, stats, kernel, views, sweeps, cg_iters, ridge)


def _as_float64_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """A float64 copy of the conv (the decompositions run in float64)."""
    return copy.deepcopy(conv).to(torch.float64)
