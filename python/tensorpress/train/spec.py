"""Layer specifications of a tenBCD network: which weights are TT-constrained, pruned, or a conv front."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tensorpress._validate import is_int
from tensorpress.tt_format import max_bond_ranks, resolve_factors, tt_params


@dataclass(frozen=True)
class TTSpec:
    """A TT-constrained weight (out_features x in_features): factors and bond ranks r_1..r_{d-1}."""

    out_factors: tuple[int, ...]
    in_factors: tuple[int, ...]
    ranks: tuple[int, ...]

    @property
    def num_params(self) -> int:
        return tt_params(self.out_factors, self.in_factors, self.ranks)

    @property
    def ratio(self) -> float:
        """TT parameters / dense parameters (< 1 is compression)."""
        return self.num_params / (math.prod(self.out_factors) * math.prod(self.in_factors))


@dataclass(frozen=True)
class ReshapedTTSpec:
    """A weight (out_features x in_features) constrained to be a tensor train of its row-major reshape.

    The weight as stored (out x in) is reshaped, row-major, into a tensor of ``shape`` (any
    factorization of out * in, which need not respect the row/column split), and that tensor is
    a TT with bond ranks ``ranks`` (r_1..r_{d-1}); cores (r_{k-1}, shape[k], r_k). This is the
    format of the tenBCD authors' CNN notebook (TensorLy's tensor_train of W.reshape(shape)),
    beside the TT-matrix format of :class:`TTSpec`.
    """

    out_features: int
    in_features: int
    shape: tuple[int, ...]
    ranks: tuple[int, ...]

    @property
    def num_params(self) -> int:
        full = (1, *self.ranks, 1)
        return sum(full[k] * n * full[k + 1] for k, n in enumerate(self.shape))

    @property
    def ratio(self) -> float:
        """TT parameters / dense parameters (< 1 is compression)."""
        return self.num_params / (self.out_features * self.in_features)


def reshaped_bond_caps(shape: Sequence[int]) -> tuple[int, ...]:
    """The largest useful rank of each bond of a TT of a tensor of this shape: min(prod left, prod right)."""
    return tuple(min(math.prod(shape[: k + 1]), math.prod(shape[k + 1 :])) for k in range(len(shape) - 1))


def reshaped_tt_spec(out_features: int, in_features: int, shape: Sequence[int], ranks, name: str = "spec"):
    """A ReshapedTTSpec: ``shape`` must multiply to out_features * in_features; ``ranks`` an int
    (one cap for every bond, each bond then capped at what a TT-SVD can give it: min(cap,
    r_{k-1} shape[k], prod of the later modes)) or d - 1 ints, each at most its bond's useful rank."""
    shape = tuple(shape) if isinstance(shape, (list, tuple)) else shape
    if (
        not isinstance(shape, tuple)
        or len(shape) < 2
        or not all(is_int(n) and n >= 1 for n in shape)
        or math.prod(shape) != out_features * in_features
    ):
        raise ValueError(
            f"{name}: shape expected >= 2 positive ints with product {out_features} * {in_features} = "
            f"{out_features * in_features}, got {shape!r}"
        )
    caps = reshaped_bond_caps(shape)
    if is_int(ranks):
        if ranks < 1:
            raise ValueError(f"{name}: expected ranks >= 1, got {ranks}")
        full = [1]
        for k in range(len(shape) - 1):
            full.append(min(ranks, full[-1] * shape[k], caps[k]))
        ranks = tuple(full[1:])
    elif isinstance(ranks, (list, tuple)) and len(ranks) == len(shape) - 1 and all(is_int(r) for r in ranks):
        bad = [k for k, (r, c) in enumerate(zip(ranks, caps)) if not 1 <= r <= c]
        if bad:
            raise ValueError(f"{name}: ranks {list(ranks)} out of range at bond(s) {bad}: expected 1..{list(caps)}")
        ranks = tuple(ranks)
    else:
        raise ValueError(f"{name}: ranks expected an int >= 1 or {len(shape) - 1} ints, got {ranks!r}")
    return ReshapedTTSpec(out_features, in_features, shape, ranks)


FLATTEN_ORDERS = ("channels", "positions")


@dataclass(frozen=True)
class ConvSpec:
    """A first layer that is a bias-free Conv2d (no padding), trained as a linear map on patches.

    in_shape: (C_in, H, W) of each input sample (given flattened, C_in*H*W features).
    The layer's output has out_channels * H_out * W_out features. flatten: the order in which the
    next layer's weight sees them: "channels" (channel-major, c * P + p, like nn.Flatten) or
    "positions" (position-major, p * C + c, the tenBCD authors' notebook). The order matters only
    to a structure that is not invariant to permuting the weight's columns (a TT of the next
    layer's weight); internally the features are always kept channel-major.
    """

    in_shape: tuple[int, int, int]
    out_channels: int
    kernel_size: int = 3
    stride: int = 1
    flatten: str = "channels"

    @property
    def out_hw(self) -> tuple[int, int]:
        _, h, w = self.in_shape
        return ((h - self.kernel_size) // self.stride + 1, (w - self.kernel_size) // self.stride + 1)

    @property
    def positions(self) -> int:
        return self.out_hw[0] * self.out_hw[1]

    @property
    def out_features(self) -> int:
        return self.out_channels * self.positions

    @property
    def patch_size(self) -> int:
        return self.in_shape[0] * self.kernel_size**2


def resolve_tt_spec(spec, in_features: int, out_features: int, name: str) -> TTSpec | ReshapedTTSpec:
    """A TTSpec from an int rank, a list of ranks, a dict(ranks=, in_factors=, out_factors=) or a TTSpec;
    a ReshapedTTSpec from one (checked against the layer) or from a dict(shape=, ranks=).

    An int rank r caps every bond at min(r, the bond's largest useful rank) and must be usable by
    at least one bond; explicit per-bond ranks must each be <= their bond's largest useful rank.
    """
    if isinstance(spec, ReshapedTTSpec):
        if (spec.out_features, spec.in_features) != (out_features, in_features):
            raise ValueError(
                f"{name}: a ReshapedTTSpec for {spec.out_features} x {spec.in_features}, the layer is "
                f"{out_features} x {in_features}"
            )
        return reshaped_tt_spec(out_features, in_features, spec.shape, spec.ranks, name)
    if isinstance(spec, Mapping) and "shape" in spec:
        unknown = set(spec) - {"ranks", "shape"}
        if unknown:
            raise ValueError(f"{name}: unknown keys {sorted(unknown)}; a reshaped TT takes shape and ranks")
        return reshaped_tt_spec(out_features, in_features, spec["shape"], spec.get("ranks"), name)
    if isinstance(spec, TTSpec):
        spec = {"ranks": spec.ranks, "in_factors": spec.in_factors, "out_factors": spec.out_factors}
    if not isinstance(spec, Mapping):
        spec = {"ranks": spec}
    unknown = set(spec) - {"ranks", "in_factors", "out_factors"}
    if unknown:
        raise ValueError(f"{name}: unknown keys {sorted(unknown)}; expected ranks, in_factors, out_factors")
    ranks, inf, outf = spec.get("ranks"), spec.get("in_factors"), spec.get("out_factors")
    inf, outf = resolve_factors(in_features, out_features, inf, outf, where=f"{name}: ")
    d = len(inf)
    if d < 2:
        raise ValueError(f"{name}: a TT layer needs at least 2 factors, got {d}")
    caps = max_bond_ranks(outf, inf)
    if is_int(ranks):
        if ranks < 1 or ranks > max(caps):
            raise ValueError(
                f"{name}: rank {ranks} is larger than possible (largest useful bond ranks "
                f"{caps} for factors {outf} x {inf})"
                if ranks >= 1
                else f"{name}: expected ranks >= 1, got {ranks}"
            )
        ranks = tuple(min(ranks, c) for c in caps)
    elif isinstance(ranks, (list, tuple)) and len(ranks) == d - 1 and all(is_int(r) for r in ranks):
        if any(r < 1 for r in ranks):
            raise ValueError(f"{name}: expected ranks >= 1, got {list(ranks)}")
        bad = [k for k, (r, c) in enumerate(zip(ranks, caps)) if r > c]
        if bad:
            raise ValueError(
                f"{name}: ranks {list(ranks)} larger than possible at bond(s) {bad}: "
                f"the largest useful ranks are {caps} for factors {outf} x {inf}"
            )
        ranks = tuple(ranks)
    else:
        raise ValueError(f"{name}: ranks expected an int >= 1 or {d - 1} ints, got {ranks!r}")
    return TTSpec(outf, inf, ranks)


def ranks_for_ratio(
    in_features: int,
    out_features: int,
    ratio: float,
    in_factors: Sequence[int] | None = None,
    out_factors: Sequence[int] | None = None,
) -> TTSpec:
    """The TTSpec with one rank cap r on every bond (bonds capped at their largest useful rank)
    whose TT/dense parameter ratio is closest to `ratio`."""
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio: expected a float in (0, 1], got {ratio!r}")
    base = resolve_tt_spec(
        {"ranks": 1, "in_factors": in_factors, "out_factors": out_factors}, in_features, out_features, "ranks_for_ratio"
    )
    assert isinstance(base, TTSpec)  # a dict spec with factors resolves to a TT-matrix
    caps = max_bond_ranks(base.out_factors, base.in_factors)
    specs = [TTSpec(base.out_factors, base.in_factors, tuple(min(r, c) for c in caps)) for r in range(1, max(caps) + 1)]
    return min(specs, key=lambda s: abs(math.log(s.ratio / ratio)))  # the first of equals, as before
