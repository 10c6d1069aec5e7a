"""CPConv2d: a Conv2d whose kernel is a CP tensor, run as 1x1 GEMMs around a depthwise conv."""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from tensorpress._validate import is_int
from tensorpress.decompose.cp import cp_als, cp_overparam
from tensorpress.linalg import blas
from tensorpress.nn import conv_paths
from tensorpress.nn._checks import check_factor_dtype, check_input_matches

METHODS = ("als", "overparam")
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def _pair(name: str, v, low: int) -> tuple[int, int]:
    vals = (v, v) if is_int(v) else v
    if not isinstance(vals, (tuple, list)) or len(vals) != 2 or any(not is_int(x) or x < low for x in vals):
        raise ValueError(f"{name}: expected an int >= {low} or a pair of them, got {v!r}")
    return int(vals[0]), int(vals[1])


def _check_positive_int(name: str, v) -> int:
    if not is_int(v) or v < 1:
        raise ValueError(f"{name}: expected a positive int, got {v!r}")
    return v


def resolve_conv_args(in_channels, out_channels, kernel_size, stride, padding, dilation, padding_mode):
    """Validated (kernel, stride, dilation, pad) with pad = (left, right, top, bottom) as F.pad
    takes it, following nn.Conv2d: 'valid' = 0, 'same' = dilation * (k - 1) split with the
    extra pixel on the right/bottom (stride 1 only)."""
    _check_positive_int("in_channels", in_channels)
    _check_positive_int("out_channels", out_channels)
    kernel = _pair("kernel_size", kernel_size, 1)
    stride = _pair("stride", stride, 1)
    dilation = _pair("dilation", dilation, 1)
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode: expected one of {PADDING_MODES}, got {padding_mode!r}")
    if isinstance(padding, str):
        if padding == "valid":
            pad = (0, 0, 0, 0)
        elif padding == "same":
            if stride != (1, 1):
                raise ValueError(
                    f"padding: 'same' is only supported with stride 1 (as in nn.Conv2d), got stride={stride}"
                )
            total = [d * (k - 1) for d, k in zip(dilation, kernel)]
            pad = (total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2)
        else:
            raise ValueError(f"padding: expected an int, a pair of ints, 'same' or 'valid', got {padding!r}")
    else:
        ph, pw = _pair("padding", padding, 0)
        pad = (pw, pw, ph, ph)
    return kernel, stride, dilation, pad


def apply_padding(x: Tensor, pad: tuple[int, int, int, int], padding_mode: str) -> Tensor:
    if not any(pad):
        return x
    if padding_mode == "zeros":
        return F.pad(x, pad)
    return F.pad(x, pad, mode=padding_mode)


def symmetric_zero_padding(pad, padding_mode) -> tuple[int, int] | None:
    """(ph, pw) when the padding can be left to the conv itself (zeros, symmetric), else None."""
    if padding_mode == "zeros" and pad[0] == pad[1] and pad[2] == pad[3]:
        return pad[2], pad[0]
    return None


def check_dense_conv(conv) -> Tensor:
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"conv: expected an nn.Conv2d, got {type(conv).__name__}")
    if conv.groups != 1:
        raise ValueError(
            f"conv: expected groups=1 (grouped/depthwise convs are not factorized), got groups={conv.groups}"
        )
    w = conv.weight.detach()
    if w.dim() != 4:
        raise ValueError(f"conv: expected a 4-D weight (out, in, kh, kw), got shape {tuple(w.shape)}")
    if not torch.isfinite(w).all() or (conv.bias is not None and not torch.isfinite(conv.bias).all()):
        raise ValueError("conv: expected finite weights, found NaN or Inf")
    return w


def conv_kwargs(conv: nn.Conv2d) -> dict:
    return dict(
        in_channels=conv.in_channels,
        out_channels=conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )


def dense_conv_like(layer: Any, weight: Tensor) -> nn.Conv2d:
    """An nn.Conv2d with `layer`'s geometry and bias and the given kernel (`layer`: any module
    with nn.Conv2d's geometry attributes: nn.Conv2d, CPConv2d, TuckerConv2d)."""
    conv = nn.Conv2d(
        layer.in_channels,
        layer.out_channels,
        layer.kernel_size,
        layer.stride,
        layer.padding,
        layer.dilation,
        bias=layer.bias is not None,
        padding_mode=layer.padding_mode,
        device=weight.device,
        dtype=weight.dtype,
    )
    with torch.no_grad():
        conv.weight.copy_(weight)
        if layer.bias is not None:
            assert conv.bias is not None  # built with bias=True above
            conv.bias.copy_(layer.bias)
    return conv


def pointwise_conv(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.conv2d(x, weight, bias) for a 1x1 ``weight`` (out, in, 1, 1). On an NCHW-contiguous x
    it is one batched GEMM on the (N, in, H*W) view, with the bias as the GEMM's addend: oneDNN's
    1x1 conv reorders NCHW to a blocked layout and back, which made it 1.2-2x slower on CPU.
    Other layouts (channels_last, strided views) go to F.conv2d, which handles them natively;
    so does torch.compile, whose inductor fails on the expanded batched GEMM once it recompiles
    for a second input shape with dynamic sizes ("cannot determine truth value of Relational")."""
    if not x.is_contiguous() or torch.compiler.is_compiling():
        return F.conv2d(x, weight, bias)
    n, c, h, w = x.shape
    out = weight.shape[0]
    w_batched = weight.reshape(out, c).expand(n, out, c)
    x_flat = x.view(n, c, h * w)
    addend = None if bias is None else bias.view(1, out, 1).expand(n, out, h * w)
    # without autograd, on the extension's OpenBLAS (linalg.blas: torch's MKL keeps to AVX2 on AMD)
    return blas.baddbmm(addend, w_batched, x_flat).view(n, out, h, w)


def pointwise_torch(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.conv2d(x, weight, bias) for a 1x1 ``weight``: torch's own conv (oneDNN on CPU)."""
    return F.conv2d(x, weight, bias)


# Largest kernel side for which one depthwise kh x kw conv (outer-product kernel) is a route:
# oneDNN's depthwise kernels are memory-bound up to 7x7 (one pass over the activations instead
# of two, 0.2-0.7x the time); at 11x11 they fall to a slow path (4-5x), not worth timing.
MAX_FUSED_DEPTHWISE = 7


def depthwise_fused(h: Tensor, kernel_h: Tensor, kernel_w: Tensor, pad: tuple[int, int], stride, dilation) -> Tensor:
    """The two depthwise stages as one kh x kw depthwise conv with kernel C[h, r] D[w, r]."""
    kernel = kernel_h * kernel_w  # (R, 1, kh, 1) * (R, 1, 1, kw)
    return F.conv2d(h, kernel, stride=stride, padding=pad, dilation=dilation, groups=kernel.shape[0])


def depthwise_separable(
    h: Tensor, kernel_h: Tensor, kernel_w: Tensor, pad: tuple[int, int], stride, dilation
) -> Tensor:
    """kh x 1 then 1 x kw depthwise convs (H stride/dilation on the first, W on the second)."""
    (sh, sw), (dh, dw), rank = stride, dilation, kernel_h.shape[0]
    h = F.conv2d(h, kernel_h, stride=(sh, 1), padding=(pad[0], 0), dilation=(dh, 1), groups=rank)
    return F.conv2d(h, kernel_w, stride=(1, sw), padding=(0, pad[1]), dilation=(1, dw), groups=rank)


# the routes of each stage, looked up at call time (tests replace entries)
POINTWISE = {"gemm": pointwise_conv, "conv": pointwise_torch}
DEPTHWISE = {"fused": depthwise_fused, "separable": depthwise_separable}


class Routes(NamedTuple):
    """The route each stage of a CPConv2d forward takes."""

    pointwise_in: str  # a key of POINTWISE
    depthwise: str  # a key of DEPTHWISE
    pointwise_out: str


def static_routes(kernel_size: tuple[int, int]) -> Routes:
    """The routes taken when nothing is measured (recording, autocast, other devices,
    autotuning off): GEMM 1x1 stages, the fused depthwise kernel up to MAX_FUSED_DEPTHWISE."""
    fused = max(kernel_size) <= MAX_FUSED_DEPTHWISE
    return Routes("gemm", "fused" if fused else "separable", "gemm")


def depthwise_candidates(kernel_size: tuple[int, int]) -> tuple[str, ...]:
    return ("fused", "separable") if max(kernel_size) <= MAX_FUSED_DEPTHWISE else ("separable",)


def pointwise_candidates(x: Tensor) -> tuple[str, ...]:
    # the GEMM route only differs from F.conv2d on NCHW-contiguous inputs
    return ("gemm", "conv") if x.is_contiguous() else ("conv",)


def check_input(x: Tensor, layer: nn.Module) -> None:
    """A conv layer's input: on its parameters' device, of their dtype, (N, in, H, W) or (in, H, W)."""
    check_input_matches(x, layer._parameters.items())
    in_channels = layer.in_channels
    if x.dim() not in (3, 4) or x.shape[-3] != in_channels:
        raise ValueError(
            f"input: expected shape (N, {in_channels}, H, W) or ({in_channels}, H, W), got {tuple(x.shape)}"
        )


def max_cp_rank(shape: tuple[int, ...]) -> int:
    """The largest CP rank any tensor of this shape has: the product of all sizes but the
    largest (the tensor is the sum of its fibres along the largest mode, each times a unit
    vector in every other mode)."""
    return math.prod(shape) // max(shape)


def check_cp_rank(rank, kernel_shape: tuple[int, int, int, int]) -> int:
    """A CP rank >= 1 that a kernel of ``kernel_shape`` can need: a larger one would only add
    redundant parameters (and, for a mistyped rank, allocate gigabytes before failing)."""
    _check_positive_int("rank", rank)
    bound = max_cp_rank(kernel_shape)
    if rank > bound:
        raise ValueError(
            f"rank: expected at most {bound} for a kernel of shape {kernel_shape} (out, in, kh, kw): "
            f"no such kernel has a larger CP rank (at most the product of all sizes but the "
            f"largest), got {rank}"
        )
    params, dense = rank * sum(kernel_shape), math.prod(kernel_shape)
    if params > dense:
        warnings.warn(
            f"rank: {rank} gives the CPConv2d {params} factor parameters, more than the dense "
            f"{'x'.join(map(str, kernel_shape))} kernel's {dense}; a rank of at most "
            f"{dense // sum(kernel_shape)} compresses",
            stacklevel=3,
        )
    return rank


class CPConv2d(nn.Module):
    r"""A 2-D convolution whose kernel W (out, in, kh, kw) is a rank-R CP tensor,

        W[o, i, h, w] = sum_r A[o, r] B[i, r] C[h, r] D[w, r],

    run as four convolutions (Lebedev et al. 2015): 1x1 in -> R (B), depthwise kh x 1 (C),
    depthwise 1 x kw (D), 1x1 R -> out (A) plus bias. Stride, padding and dilation act on the
    depthwise stages, so the layer computes exactly nn.Conv2d with weight :meth:`to_dense` for
    every stride/padding/dilation/padding_mode. For CPU speed each 1x1 stage runs either as
    batched GEMMs (:func:`pointwise_conv`) or as torch's 1x1 conv, and the two depthwise stages
    either as one kh x kw depthwise conv with kernel C[h, r] D[w, r] (kernels up to
    ``MAX_FUSED_DEPTHWISE`` a side) or as two 1-D ones: the first eager CPU call of each shape
    times the routes and keeps the fastest for the process (:mod:`tensorpress.nn.conv_paths`;
    ``conv_paths.set_autotune(False)`` keeps the static GEMM / fused routes).

    Args: those of nn.Conv2d (groups must be 1) plus ``rank`` R, 1 <= R <= the largest CP rank
    of a kernel of this shape (:func:`max_cp_rank`: out * in * kh * kw over the largest of the
    four; a larger R only adds redundant parameters). ``dtype``: float32, float64, float16 or
    bfloat16.

    Parameters (conv-shaped, used as they are): ``pointwise_in`` (R, in, 1, 1),
    ``depthwise_h`` (R, 1, kh, 1), ``depthwise_w`` (R, 1, 1, kw), ``pointwise_out``
    (out, R, 1, 1), ``bias`` (out,).

    Shape: input (N, in, H, W) or (in, H, W) -> output (N, out, H_out, W_out), H_out and W_out
    as for nn.Conv2d.
    """

    decomposition: Any  # set by from_dense: the CPResult it came from

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        rank: int,
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
            raise ValueError(f"groups: expected 1 (CPConv2d factorizes a full conv), got {groups!r}")
        check_factor_dtype(dtype)
        self.kernel_size, self.stride, self.dilation, self._pad = resolve_conv_args(
            in_channels, out_channels, kernel_size, stride, padding, dilation, padding_mode
        )
        check_cp_rank(rank, (out_channels, in_channels, *self.kernel_size))
        self.in_channels, self.out_channels, self.rank = in_channels, out_channels, rank
        self.padding, self.padding_mode, self.groups = padding, padding_mode, 1
        kh, kw = self.kernel_size
        self.pointwise_in = nn.Parameter(torch.empty(rank, in_channels, 1, 1, **factory))
        self.depthwise_h = nn.Parameter(torch.empty(rank, 1, kh, 1, **factory))
        self.depthwise_w = nn.Parameter(torch.empty(rank, 1, 1, kw, **factory))
        self.pointwise_out = nn.Parameter(torch.empty(out_channels, rank, 1, 1, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Factors i.i.d. normal, scaled so that W's entries have nn.Conv2d's default variance
        1 / (3 fan_in): Var W = R * prod_k s_k^2, so each s_k^2 = (1 / (3 fan_in R))^(1/4)."""
        fan_in = self.in_channels * math.prod(self.kernel_size)
        std = (1.0 / (3 * fan_in * self.rank)) ** 0.125
        for p in (self.pointwise_in, self.depthwise_h, self.depthwise_w, self.pointwise_out):
            nn.init.normal_(p, 0.0, std)
        if self.bias is not None:
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self)
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        y = self.forward_routes(x, self.routes(x))
        return y.squeeze(0) if unbatched else y

    def forward_routes(self, x: Tensor, routes: Routes) -> Tensor:
        """The forward on a batched input with the given stage routes (all compute the same)."""
        return self._stages(
            x, routes, self.pointwise_in, self.depthwise_h, self.depthwise_w, self.pointwise_out, self.bias
        )

    def _stages(self, x, routes: Routes, p_in, k_h, k_w, p_out, bias) -> Tensor:
        h = POINTWISE[routes.pointwise_in](x, p_in)
        h, pad = self._depthwise_input(h)
        h = DEPTHWISE[routes.depthwise](h, k_h, k_w, pad, self.stride, self.dilation)
        return POINTWISE[routes.pointwise_out](h, p_out, bias)

    def _depthwise_input(self, h: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """h padded for the depthwise stages, and the (symmetric zero) padding left to the conv."""
        sym = symmetric_zero_padding(self._pad, self.padding_mode)
        if sym is None:
            return apply_padding(h, self._pad, self.padding_mode), (0, 0)
        return h, sym

    def routes(self, x: Tensor) -> Routes:
        """The stage routes for a batched input: measured on the first call of its shape key
        (`conv_paths`), the static ones where nothing may be measured."""
        params = tuple(self._parameters.values())
        if not conv_paths.may_measure(x, *params):
            return static_routes(self.kernel_size)
        training = conv_paths.autograd_wanted(x, *params)
        key = (
            type(self).__name__,
            self.in_channels,
            self.out_channels,
            self.rank,
            self.kernel_size,
            self.stride,
            self.dilation,
            self._pad,
            self.padding_mode,
            self.bias is not None,
            *conv_paths.call_key(x, training),
        )
        return conv_paths.cached_choice(key, lambda: self._measure_routes(x, training))

    def route_candidates(self, x: Tensor) -> list[Routes]:
        """Every combination of routes for this input, the static one first (it wins ties)."""
        pointwise = pointwise_candidates(x)  # a channels_last input stays channels_last throughout
        return [Routes(a, d, b) for a in pointwise for d in depthwise_candidates(self.kernel_size) for b in pointwise]

    def _measure_routes(self, x: Tensor, training: bool) -> Routes:
        """The fastest combination of routes, each timed as a whole forward (forward + backward
        when the call builds a graph) on the call's input, detached. Whole forwards, not stages
        one by one: memory-bound stages share caches and allocations, and at 32x64x56x56 the
        stage-by-stage choice was 30% slower than the best combination."""
        factors = tuple(
            conv_paths.leaf(p, p is not None and p.requires_grad)
            for p in (self.pointwise_in, self.depthwise_h, self.depthwise_w, self.pointwise_out, self.bias)
        )
        x = conv_paths.leaf(x, x.requires_grad)
        wrt = (x, *(f for f in factors if f is not None))
        return conv_paths.fastest(
            {
                r: conv_paths.runner(functools.partial(self._stages, x, r, *factors), wrt, training)
                for r in self.route_candidates(x)
            }
        )

    def _depthwise_fused(self, h: Tensor, pad: tuple[int, int]) -> Tensor:
        return depthwise_fused(h, self.depthwise_h, self.depthwise_w, pad, self.stride, self.dilation)

    def _depthwise_separable(self, h: Tensor, pad: tuple[int, int]) -> Tensor:
        return depthwise_separable(h, self.depthwise_h, self.depthwise_w, pad, self.stride, self.dilation)

    # ------------------------------------------------------------------ conversions
    @classmethod
    def from_dense(cls, conv: nn.Conv2d, rank: int, method: str = "als", **kwargs) -> CPConv2d:
        """A CPConv2d approximating ``conv`` (groups=1) by a rank-``rank`` CP decomposition of
        its kernel: ``method="als"`` (:func:`~tensorpress.decompose.cp_als`, SVD start) or
        ``"overparam"`` (:func:`~tensorpress.decompose.cp_overparam`); ``kwargs`` go to it.
        The decomposition runs in float64; each component's weight is spread evenly over
        its four factors (keeps fp16/bf16 factors in range). The bias is copied.
        ``layer.decomposition`` holds the CPResult (rel_error, history)."""
        w = check_dense_conv(conv)
        _check_positive_int("rank", rank)
        if method not in METHODS:
            raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
        layer = cls(rank=rank, **conv_kwargs(conv))
        layer.padding = conv.padding
        res = (cp_als if method == "als" else cp_overparam)(w.to(torch.float64), rank, **kwargs)
        scale = res.weights.to(torch.float64).abs() ** 0.25
        a, b, c, d = (f.to(torch.float64) * scale for f in res.factors)
        kh, kw = layer.kernel_size
        with torch.no_grad():
            layer.pointwise_out.copy_(a.reshape(conv.out_channels, rank, 1, 1))
            layer.pointwise_in.copy_(b.T.reshape(rank, conv.in_channels, 1, 1))
            layer.depthwise_h.copy_(c.T.reshape(rank, 1, kh, 1))
            layer.depthwise_w.copy_(d.T.reshape(rank, 1, 1, kw))
            if conv.bias is not None:
                assert layer.bias is not None  # built with conv's bias above
                layer.bias.copy_(conv.bias)
        layer.decomposition = res
        return layer

    def to_dense(self) -> Tensor:
        """The kernel W (out, in, kh, kw)."""
        return torch.einsum(
            "or,ri,rh,rw->oihw",
            self.pointwise_out[:, :, 0, 0],
            self.pointwise_in[:, :, 0, 0],
            self.depthwise_h[:, 0, :, 0],
            self.depthwise_w[:, 0, 0, :],
        )

    def to_conv(self) -> nn.Conv2d:
        """The equivalent nn.Conv2d (kernel :meth:`to_dense`, same bias and geometry)."""
        return dense_conv_like(self, self.to_dense())

    @property
    def compression_ratio(self) -> float:
        """Dense kernel entries per factor parameter (bias not counted)."""
        kh, kw = self.kernel_size
        dense = self.out_channels * self.in_channels * kh * kw
        return dense / (self.rank * (self.out_channels + self.in_channels + kh + kw))

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, rank={self.rank}, "
            f"stride={self.stride}"
        )
        if self.padding not in (0, (0, 0), "valid"):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode}"
        return s + f", bias={self.bias is not None}, {self.compression_ratio:.1f}x smaller"
