"""TuckerConv2d: a Conv2d whose kernel is a Tucker-2 tensor (1x1, small k x k core, 1x1)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from tensorpress._validate import is_int
from tensorpress.decompose.tucker import feasible_ranks, multi_mode_product, tucker
from tensorpress.nn._checks import check_factor_dtype
from tensorpress.nn.cp_conv2d import (
    apply_padding,
    check_dense_conv,
    check_input,
    conv_kwargs,
    dense_conv_like,
    resolve_conv_args,
    symmetric_zero_padding,
)


def _requested_ranks(ranks) -> tuple[int, int]:
    vals = (ranks, ranks) if is_int(ranks) else ranks
    if not isinstance(vals, (tuple, list)) or len(vals) != 2 or any(not is_int(r) or r < 1 for r in vals):
        raise ValueError(f"ranks: expected (r_out, r_in), two ints >= 1 (or one int for both), got {ranks!r}")
    return int(vals[0]), int(vals[1])


def _resolve_ranks(ranks, in_channels: int, out_channels: int) -> tuple[int, int]:
    r_out, r_in = _requested_ranks(ranks)
    return min(r_out, out_channels), min(r_in, in_channels)


def tucker_params(ranks: tuple[int, int], in_channels: int, out_channels: int, kernel: tuple[int, ...]) -> int:
    """Factor parameters of a Tucker-2 conv (bias not counted): first, core, last."""
    r_out, r_in = ranks
    return r_in * in_channels + r_out * r_in * math.prod(kernel) + out_channels * r_out


def warn_if_capped_past_dense(
    requested, ranks: tuple[int, int], in_channels: int, out_channels: int, kernel: tuple[int, ...]
) -> None:
    """Capping the requested ranks is silent otherwise: say so when the capped layer is no
    smaller than the dense conv it stands for (then it compresses nothing)."""
    if tuple(requested) == tuple(ranks):
        return
    params = tucker_params(ranks, in_channels, out_channels, kernel)
    dense = out_channels * in_channels * math.prod(kernel)
    if params >= dense:
        warnings.warn(
            f"ranks: {tuple(requested)} capped to {tuple(ranks)} for a {out_channels}x{in_channels}x"
            f"{kernel[0]}x{kernel[1]} kernel; the TuckerConv2d has {params} factor parameters, not fewer "
            f"than the dense kernel's {dense}",
            stacklevel=3,
        )


class TuckerConv2d(nn.Module):
    r"""A 2-D convolution whose kernel W (out, in, kh, kw) is a Tucker-2 tensor,

        W[o, i, h, w] = sum_{a, b} U_out[o, a] G[a, b, h, w] U_in[i, b],

    run as three convolutions (Kim et al. 2016): 1x1 in -> r_in (U_in^T), the core conv
    r_in -> r_out with kernel kh x kw carrying stride, padding and dilation (G), and 1x1
    r_out -> out (U_out) plus bias. Computes exactly nn.Conv2d with weight :meth:`to_dense`.

    Args: those of nn.Conv2d (groups must be 1) plus ``ranks`` = (r_out, r_in) (an int sets
    both); each is capped at its channel count, with a warning when the capped layer has no
    fewer parameters than the dense kernel. ``dtype``: float32, float64, float16 or bfloat16.

    Parameters: ``first`` (r_in, in, 1, 1), ``core`` (r_out, r_in, kh, kw), ``last``
    (out, r_out, 1, 1), ``bias`` (out,).

    Shape: input (N, in, H, W) or (in, H, W) -> output (N, out, H_out, W_out) as nn.Conv2d.
    """

    decomposition: Any  # set by from_dense: the TuckerResult it came from

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        ranks: int | Sequence[int],
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        if groups != 1:
            raise ValueError(f"groups: expected 1 (TuckerConv2d factorizes a full conv), got {groups!r}")
        check_factor_dtype(dtype)
        self.kernel_size, self.stride, self.dilation, self._pad = resolve_conv_args(
            in_channels, out_channels, kernel_size, stride, padding, dilation, padding_mode
        )
        self.ranks = _resolve_ranks(ranks, in_channels, out_channels)
        warn_if_capped_past_dense(_requested_ranks(ranks), self.ranks, in_channels, out_channels, self.kernel_size)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.padding, self.padding_mode, self.groups = padding, padding_mode, 1
        r_out, r_in = self.ranks
        self.first = nn.Parameter(torch.empty(r_in, in_channels, 1, 1, **factory))
        self.core = nn.Parameter(torch.empty(r_out, r_in, *self.kernel_size, **factory))
        self.last = nn.Parameter(torch.empty(out_channels, r_out, 1, 1, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Factors i.i.d. normal so that W's entries have nn.Conv2d's default variance
        1 / (3 fan_in): Var W = r_out r_in prod_k s_k^2, each s_k^2 the cube root of
        1 / (3 fan_in r_out r_in)."""
        fan_in = self.in_channels * math.prod(self.kernel_size)
        std = (1.0 / (3 * fan_in * self.ranks[0] * self.ranks[1])) ** (1 / 6)
        for p in (self.first, self.core, self.last):
            nn.init.normal_(p, 0.0, std)
        if self.bias is not None:
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self)
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        h = F.conv2d(x, self.first)
        sym = symmetric_zero_padding(self._pad, self.padding_mode)
        if sym is None:
            h = apply_padding(h, self._pad, self.padding_mode)
            sym = (0, 0)
        h = F.conv2d(h, self.core, stride=self.stride, padding=sym, dilation=self.dilation)
        y = F.conv2d(h, self.last, self.bias)
        return y.squeeze(0) if unbatched else y

    # ------------------------------------------------------------------ conversions
    @classmethod
    def from_dense(
        cls, conv: nn.Conv2d, ranks: int | Sequence[int], n_iter_max: int = 50, tol: float = 1e-6
    ) -> TuckerConv2d:
        """A TuckerConv2d approximating ``conv`` (groups=1): Tucker-2 of its kernel on the
        (out, in) modes by HOSVD refined with HOOI (:func:`~tensorpress.decompose.tucker`,
        float64; the spatial modes are kept whole). Exact when ranks = (out, in).
        ``layer.decomposition`` holds the TuckerResult (rel_error, history)."""
        w = check_dense_conv(conv)
        kh, kw = conv.kernel_size
        # a mode's rank is also bounded by the product of the other modes' ranks (HOOI returns
        # no more: a 1x1 conv's ranks (3, 2) come out (2, 2)); the spatial modes too
        r_out, r_in, s_h, s_w = feasible_ranks([*_requested_ranks(ranks), kh, kw], w.shape)
        warn_if_capped_past_dense(
            _requested_ranks(ranks), (r_out, r_in), conv.in_channels, conv.out_channels, conv.kernel_size
        )
        layer = cls(ranks=(r_out, r_in), **conv_kwargs(conv))
        res = tucker(w.to(torch.float64), [r_out, r_in, s_h, s_w], n_iter_max=n_iter_max, tol=tol)
        # the spatial factors (kh x s_h, kw x s_w; square unless a rank bounds them) go back
        # into the core, which keeps the whole kh x kw kernel
        core = multi_mode_product(res.core, [None, None, res.factors[2], res.factors[3]])
        with torch.no_grad():
            layer.last.copy_(res.factors[0].reshape(conv.out_channels, r_out, 1, 1))
            layer.first.copy_(res.factors[1].T.reshape(r_in, conv.in_channels, 1, 1))
            layer.core.copy_(core)
            if conv.bias is not None:
                assert layer.bias is not None  # built with conv's bias above
                layer.bias.copy_(conv.bias)
        layer.decomposition = res
        return layer

    def to_dense(self) -> Tensor:
        """The kernel W (out, in, kh, kw)."""
        return torch.einsum("oa,abhw,bi->oihw", self.last[:, :, 0, 0], self.core, self.first[:, :, 0, 0])

    def to_conv(self) -> nn.Conv2d:
        """The equivalent nn.Conv2d (kernel :meth:`to_dense`, same bias and geometry)."""
        return dense_conv_like(self, self.to_dense())

    @property
    def compression_ratio(self) -> float:
        """Dense kernel entries per factor parameter (bias not counted)."""
        dense = self.out_channels * self.in_channels * math.prod(self.kernel_size)
        return dense / tucker_params(self.ranks, self.in_channels, self.out_channels, self.kernel_size)

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, ranks={self.ranks}, "
            f"stride={self.stride}"
        )
        if self.padding not in (0, (0, 0), "valid"):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode}"
        return s + f", bias={self.bias is not None}, {self.compression_ratio:.1f}x smaller"
