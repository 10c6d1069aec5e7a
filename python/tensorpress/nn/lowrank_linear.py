"""LowRankLinear: a Linear whose weight is a rank-r product, run as two thin linears."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from tensorpress._validate import is_int
from tensorpress.linalg.svd import truncated_svd
from tensorpress.nn._checks import check_factor_dtype, check_input_matches


def _check_rank(rank, in_features: int, out_features: int) -> int:
    if not is_int(rank) or rank < 1:
        raise ValueError(f"rank: expected an int >= 1, got {rank!r}")
    if rank > min(in_features, out_features):
        raise ValueError(
            f"rank: expected at most min(in_features, out_features) = {min(in_features, out_features)}, got {rank}"
        )
    return rank


def check_dense_linear(linear) -> Tensor:
    """The weight of ``linear`` after checking it is a plain nn.Linear-like module."""
    weight = getattr(linear, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise TypeError(f"linear: expected an nn.Linear (a 2-D weight), got {type(linear).__name__}")
    if not weight.is_floating_point():
        raise TypeError(f"linear: expected a floating-point weight, got {weight.dtype}")
    return weight


class LowRankLinear(nn.Module):
    r"""y = x (second @ first)^T + bias, computed as two linears: in -> rank -> out.

    Costs rank (in + out) multiply-adds per sample instead of in * out.

    Args: in_features, out_features, rank (1 <= rank <= min(in, out)), bias, device, dtype
    (float32, float64, float16 or bfloat16).

    Parameters: ``first`` (rank, in_features), ``second`` (out_features, rank),
    ``bias`` (out_features,).

    Shape: input (*, in_features) -> output (*, out_features), as nn.Linear.
    """

    def __init__(
        self, in_features: int, out_features: int, rank: int, bias: bool = True, device=None, dtype=None
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        check_factor_dtype(dtype)
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if not is_int(v) or v < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
        self.in_features, self.out_features = in_features, out_features
        self.rank = _check_rank(rank, in_features, out_features)
        self.first = nn.Parameter(torch.empty(rank, in_features, **factory))
        self.second = nn.Parameter(torch.empty(out_features, rank, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Factors i.i.d. normal so that the product has nn.Linear's default weight variance
        1 / (3 in_features); bias uniform as nn.Linear."""
        std = (1.0 / (3 * self.in_features * self.rank)) ** 0.25
        nn.init.normal_(self.first, 0.0, std)
        nn.init.normal_(self.second, 0.0, std)
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        check_input_matches(x, self._parameters.items())
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"input: expected shape (..., {self.in_features}), got {tuple(x.shape)}")
        return F.linear(F.linear(x, self.first), self.second, self.bias)

    @classmethod
    def from_factors(cls, first: Tensor, second: Tensor, bias: Tensor | None, dtype=None, device=None) -> LowRankLinear:
        """A layer holding the given factors (copied, cast to ``dtype``/``device``)."""
        if first.dim() != 2 or second.dim() != 2 or second.shape[1] != first.shape[0]:
            raise ValueError(
                f"first, second: expected (rank, in) and (out, rank), got {tuple(first.shape)} "
                f"and {tuple(second.shape)}"
            )
        dtype = dtype or first.dtype
        layer = cls(
            first.shape[1],
            second.shape[0],
            first.shape[0],
            bias=bias is not None,
            dtype=dtype,
            device=device or first.device,
        )
        with torch.no_grad():
            layer.first.copy_(first)
            layer.second.copy_(second)
            if bias is not None:
                assert layer.bias is not None  # built with a bias above
                layer.bias.copy_(bias)
        return layer

    @classmethod
    def from_dense(cls, linear: nn.Linear, rank: int) -> LowRankLinear:
        """The best rank-``rank`` approximation of ``linear``'s weight in Frobenius norm
        (truncated SVD in float64, singular values split evenly between the factors). For a
        data-aware approximation use :func:`tensorpress.compress.compress`."""
        weight = check_dense_linear(linear)
        out_features, in_features = weight.shape
        _check_rank(rank, in_features, out_features)
        u, s, vh = truncated_svd(weight.detach().to(torch.float64), rank)
        root = s.sqrt()
        bias = None if linear.bias is None else linear.bias.detach()
        return cls.from_factors(root[:, None] * vh, u * root, bias, dtype=weight.dtype, device=weight.device)

    def to_dense(self) -> Tensor:
        """The weight second @ first (out_features, in_features)."""
        return self.second @ self.first

    def to_linear(self) -> nn.Linear:
        """The equivalent nn.Linear."""
        lin = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=self.first.device,
            dtype=self.first.dtype,
        )
        with torch.no_grad():
            lin.weight.copy_(self.to_dense())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    @property
    def compression_ratio(self) -> float:
        """Dense weight entries per factor parameter (bias not counted)."""
        return self.in_features * self.out_features / (self.rank * (self.in_features + self.out_features))

    def extra_repr(self) -> str:
        return (
            f"{self.in_features} -> {self.out_features}, rank={self.rank}, bias={self.bias is not None}, "
            f"{self.compression_ratio:.1f}x smaller"
        )
