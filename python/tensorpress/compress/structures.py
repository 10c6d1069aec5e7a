"""What compress() can turn a layer into: one adapter per structure.

An adapter says which layers it applies to, how a parameter budget becomes a rank, how a rank
is validated, how a layer is fitted (weights only, or from calibration statistics), which
module replaces it and what that module costs per calibration row.

* ``lowrank``: nn.Linear -> LowRankLinear (two thin linears); rank r.
* ``tt``: nn.Linear -> TTLinear (balanced factors of both sides); a bond rank for every bond
  (an int sets all). Needs both sides to split into at least two factors.
* ``tucker``: nn.Conv2d (groups=1) -> TuckerConv2d; ranks (r_out, r_in) (an int sets both).
* ``cp``: nn.Conv2d (groups=1) -> CPConv2d; rank R.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, cast, runtime_checkable

import torch
from torch import nn

from tensorpress._validate import is_int
from tensorpress.compress.stats import GramStats
from tensorpress.tt_format import capped_ranks, max_bond_ranks, prime_factors, tt_params

if TYPE_CHECKING:  # the replacing modules import the fits lazily (import cycles otherwise)
    from tensorpress.compress.lowrank import LowRankFit
    from tensorpress.nn.cp_conv2d import CPConv2d
    from tensorpress.nn.lowrank_linear import LowRankLinear
    from tensorpress.nn.tt_linear import TTLinear
    from tensorpress.nn.tucker_conv2d import TuckerConv2d

# the structures for each layer type, to point the user at the right one
_STRUCTURES_OF = {nn.Linear: "'lowrank' or 'tt'", nn.Conv2d: "'tucker' or 'cp'"}


def _type_reason(module: nn.Module, cls: type, structure: str) -> str | None:
    """Why ``module`` is not a ``cls`` the structure replaces (None when it is one): an exact
    type is required, since a subclass's forward may do more than the base class's."""
    if type(module) is cls:
        return None
    kind = type(module).__name__
    if isinstance(module, cls):
        return f"{kind} subclasses nn.{cls.__name__}: unsupported type (its forward may differ from the base class's)"
    other = next((c for c in _STRUCTURES_OF if type(module) is c), None)
    hint = f" (use structure={_STRUCTURES_OF[other]} for nn.{other.__name__})" if other is not None else ""
    return f"{kind}: structure={structure!r} replaces nn.{cls.__name__} only{hint}"


class LowRank:
    name = "lowrank"
    methods: tuple[str, ...] = ("svd", "whitened", "activation", "convex", "convex_weights", "relu", "gelu")

    def why_not(self, module: nn.Module) -> str | None:
        """None when the layer can be replaced, else why it cannot (for the report's account)."""
        wrong = _type_reason(module, nn.Linear, self.name)
        if wrong:
            return wrong
        layer = cast(nn.Linear, module)  # _type_reason: exactly an nn.Linear
        if min(layer.in_features, layer.out_features) >= 2:
            return None
        return (
            f"{layer.out_features}x{layer.in_features}: a side of one feature leaves no rank to reduce "
            f"(rank 1 is the layer itself)"
        )

    def eligible(self, module: nn.Module) -> bool:
        return self.why_not(module) is None

    def describe(self) -> str:
        return "nn.Linear layers with both sides >= 2"

    def uniform_rank(self, layer: nn.Linear, budget: float) -> int:
        """The largest r with r (in + out) + out <= budget * (in out + bias), at least 1."""
        from tensorpress.compress.allocate import allocate_uniform

        return allocate_uniform({"layer": layer}, budget)["layer"]

    def rank_params(self, layer: nn.Linear, rank: int) -> int:
        """Parameters of the two thin factors and the bias the fits leave free."""
        from tensorpress.compress.allocate import lowrank_params

        return lowrank_params(layer, rank)

    def rank_dof(self, layer: nn.Linear, rank: int) -> int:
        """Dimension of the rank-r matrices plus the bias."""
        from tensorpress.compress.allocate import lowrank_dof

        return lowrank_dof(layer, rank)

    def check_rank(self, name: str, layer: nn.Linear, rank) -> int:
        top = min(layer.in_features, layer.out_features)
        if not is_int(rank) or not 1 <= rank <= top:
            raise ValueError(
                f"ranks: layer {name!r} ({layer.out_features}x{layer.in_features}) needs a rank in "
                f"[1, {top}], got {rank!r}"
            )
        return rank

    def fit(self, method: str, layer: nn.Linear, stats: GramStats | None, rank: int, ridge_kw: dict, offset=None):
        """The rank-r fit by ``method`` (offset: residual feedback, "activation" only)."""
        from tensorpress.compress.lowrank import fit_activation, fit_svd

        if method == "svd":
            return fit_svd(layer.weight, layer.bias, rank)
        if stats is None:
            raise ValueError(f"method={method!r}: needs calibration statistics")
        if method in ("whitened", "activation"):
            return fit_activation(layer.weight, layer.bias, stats, rank, offset=offset, **ridge_kw)
        if method == "convex_weights":
            from tensorpress.compress.convex import fit_convex_weights

            return fit_convex_weights(
                layer.weight,
                layer.bias,
                stats.n,
                stats.mean_in,
                stats.mean_ref,
                stats.gram_in(),
                stats.cross(),
                rank,
                **ridge_kw,
            )
        from tensorpress.compress.convex import fit_convex
        from tensorpress.compress.relu import fit_gelu, fit_relu

        x_ref, x_in = stats.samples()
        fitters: dict[str, Callable[..., LowRankFit]] = {"convex": fit_convex, "relu": fit_relu, "gelu": fit_gelu}
        fitter = fitters[method]
        return fitter(layer.weight, layer.bias, x_ref, x_in, rank, **ridge_kw)

    def module(self, layer: nn.Linear, fit) -> nn.Module:
        from tensorpress.nn.lowrank_linear import LowRankLinear

        return LowRankLinear.from_factors(
            fit.first, fit.second, fit.bias, dtype=layer.weight.dtype, device=layer.weight.device
        )

    def macs_per_row(self, layer: nn.Linear, module: nn.Module) -> int:
        return cast("LowRankLinear", module).rank * (layer.in_features + layer.out_features)

    def report_rank(self, fit) -> int:
        return fit.rank


class TT:
    name = "tt"
    methods: tuple[str, ...] = ("svd", "whitened", "activation")

    def why_not(self, module: nn.Module) -> str | None:
        wrong = _type_reason(module, nn.Linear, self.name)
        if wrong:
            return wrong
        layer = cast(nn.Linear, module)  # _type_reason: exactly an nn.Linear
        prime = [
            f"{side} {n}"
            for side, n in (("in_features", layer.in_features), ("out_features", layer.out_features))
            if len(prime_factors(n)) < 2
        ]
        if prime:
            return f"{' and '.join(prime)} do not split into >= 2 factors: no TT cores to form"
        return None

    def eligible(self, module: nn.Module) -> bool:
        return self.why_not(module) is None

    def describe(self) -> str:
        return "nn.Linear layers whose sides both split into >= 2 factors"

    def factors(self, layer: nn.Linear) -> tuple[tuple[int, ...], tuple[int, ...]]:
        from tensorpress.compress.tt import tt_factors

        in_f, out_f = tt_factors(layer)
        return out_f, in_f

    def uniform_rank(self, layer: nn.Linear, budget: float):
        from tensorpress.compress.tt import uniform_tt_rank

        out_f, in_f = self.factors(layer)
        return capped_ranks(uniform_tt_rank(layer, budget, out_f, in_f), out_f, in_f)

    def rank_params(self, layer: nn.Linear, rank) -> int:
        """Parameters of the compressed layer (cores and the bias the fits leave free)."""
        out_f, in_f = self.factors(layer)
        return tt_params(out_f, in_f, rank) + layer.out_features

    def rank_dof(self, layer: nn.Linear, rank) -> int:
        """Dimension of the TT manifold (each bond's r x r gauge removed) plus the bias."""
        from tensorpress.rank.layer import tt_degrees_of_freedom

        return tt_degrees_of_freedom(list(rank), *self.factors(layer)) + layer.out_features

    def check_rank(self, name: str, layer: nn.Linear, rank):
        out_f, in_f = self.factors(layer)
        d = len(out_f)
        if is_int(rank, 1):
            return capped_ranks(rank, out_f, in_f)
        if isinstance(rank, (list, tuple)) and len(rank) == d - 1 and all(is_int(r, 1) for r in rank):
            return tuple(min(r, c) for r, c in zip(rank, max_bond_ranks(out_f, in_f)))
        raise ValueError(
            f"ranks: layer {name!r} (TT factors {out_f}x{in_f}) needs an int bond rank >= 1 or "
            f"{d - 1} of them, got {rank!r}"
        )

    def fit(self, method: str, layer: nn.Linear, stats: GramStats | None, rank, ridge_kw: dict):
        from tensorpress.compress.tt import fit_tt_activation, fit_tt_svd

        out_f, in_f = self.factors(layer)
        if method == "svd":
            return fit_tt_svd(layer.weight, layer.bias, list(rank), out_f, in_f)
        if stats is None:
            raise ValueError(f"method={method!r}: needs calibration statistics")
        return fit_tt_activation(layer.weight, layer.bias, stats, list(rank), out_f, in_f, **ridge_kw)

    def module(self, layer: nn.Linear, fit) -> nn.Module:
        from tensorpress.nn.tt_linear import TTLinear

        return TTLinear.from_cores(
            fit.cores, fit.bias, fit.in_factors, fit.out_factors, device=layer.weight.device, dtype=layer.weight.dtype
        )

    def macs_per_row(self, layer: nn.Linear, module: nn.Module) -> int:
        from tensorpress.ops.tt_plan import choose_plan

        batch = 256
        return int(choose_plan(cast("TTLinear", module).core_shapes, batch).flops // (2 * batch))

    def report_rank(self, fit) -> int:
        return fit.rank


class _ConvStructure:
    name: str  # each subclass's
    methods: tuple[str, ...] = ("svd", "whitened", "activation")

    def why_not(self, module: nn.Module) -> str | None:
        wrong = _type_reason(module, nn.Conv2d, self.name)
        if wrong:
            return wrong
        conv = cast(nn.Conv2d, module)  # _type_reason: exactly an nn.Conv2d
        g, i, o = conv.groups, conv.in_channels, conv.out_channels
        if g > 1:
            # the fits factor one dense (out, in) channel map; a grouped conv has one per group
            # (a block-diagonal map; per-group factors would need a grouped layer class)
            depthwise = "; a depthwise conv (groups = in_channels) mixes no channels: none to reduce" if g == i else ""
            return (
                f"grouped conv (groups={g}): not supported by {self.name}, which factors one dense channel map "
                f"(groups=1){depthwise}"
            )
        if i == 1:
            return (
                f"one input channel: {self.name} has no input channels to reduce (the conv is already a "
                f"{o}x{conv.kernel_size[0]}x{conv.kernel_size[1]} map)"
            )
        if o == 1:
            return f"one output channel: {self.name} has no output channels to reduce"
        return None

    def eligible(self, module: nn.Module) -> bool:
        return self.why_not(module) is None

    def describe(self) -> str:
        return "nn.Conv2d layers with groups=1 and at least 2 input and output channels"

    def module(self, layer: nn.Conv2d, fit) -> nn.Module:
        return fit.module.to(device=layer.weight.device, dtype=layer.weight.dtype)


SPLIT_FACTORS = (0.5, 2.0)  # Tucker's r_out relative to the channel-ratio split, tried by the rank rules


class Tucker(_ConvStructure):
    name = "tucker"

    @staticmethod
    def params(layer: nn.Conv2d, r_out: int, r_in: int) -> int:
        kh, kw = layer.kernel_size
        return r_in * layer.in_channels + r_out * r_in * kh * kw + layer.out_channels * r_out + layer.out_channels

    @staticmethod
    def feasible(layer: nn.Conv2d, r_out: int, r_in: int) -> tuple[int, int, int, int]:
        """(r_out, r_in, s_h, s_w): the ranks TuckerConv2d.from_dense fits, each at most its
        mode's size and the product of the other ranks (a 1x1 conv's (3, 2) is (2, 2))."""
        from tensorpress.decompose.tucker import feasible_ranks

        r_o, r_i, s_h, s_w = feasible_ranks([r_out, r_in, *layer.kernel_size], layer.weight.shape)
        return r_o, r_i, s_h, s_w

    def uniform_rank(self, layer: nn.Conv2d, budget: float):
        """The largest (r_out, r_in) in the channels' ratio that fits the budget (made feasible,
        so the budget is charged for the ranks the layer gets)."""
        o, i = layer.out_channels, layer.in_channels
        allowed = budget * (layer.weight.numel() + o)
        best = (1, 1)
        for step in range(1, max(o, i) + 1):
            r_out, r_in = max(1, min(o, round(step * o / max(o, i)))), max(1, min(i, round(step * i / max(o, i))))
            rank = self.feasible(layer, r_out, r_in)[:2]
            if self.params(layer, *rank) > allowed:
                break
            best = rank
        return best

    def rank_variants(self, layer: nn.Conv2d, rank) -> list[tuple[int, int]]:
        """Other (r_out, r_in) splits of about the parameters of ``rank``: r_out a factor of
        SPLIT_FACTORS away, r_in the largest that keeps the count at most rank's. The uniform
        rule splits in the channels' ratio; with a rank rule these compete with it on their
        measured errors, so the split is chosen by the fit."""
        o, i = layer.out_channels, layer.in_channels
        kh, kw = layer.kernel_size
        allowed = self.params(layer, *rank)
        out = []
        for factor in SPLIT_FACTORS:
            r_out = max(1, min(o, round(rank[0] * factor)))
            # params = r_in (i + r_out kh kw) + o r_out + o  <=  allowed
            r_in = min(i, (allowed - o - o * r_out) // (i + r_out * kh * kw))
            if r_in < 1:
                continue
            split = self.feasible(layer, r_out, r_in)[:2]
            if split != tuple(rank) and self.params(layer, *split) <= allowed:
                out.append(split)
        return out

    def rank_params(self, layer: nn.Conv2d, rank) -> int:
        return self.params(layer, *rank)

    def rank_dof(self, layer: nn.Conv2d, rank) -> int:
        """Dimension of the Tucker manifold (spatial modes kept whole) plus the bias."""
        from tensorpress.rank.regressors import tucker_degrees_of_freedom

        return tucker_degrees_of_freedom(self.feasible(layer, *rank), tuple(layer.weight.shape)) + layer.out_channels

    def check_rank(self, name: str, layer: nn.Conv2d, rank):
        o, i = layer.out_channels, layer.in_channels
        pair = (rank, rank) if is_int(rank, 1) else rank
        if isinstance(pair, (list, tuple)) and len(pair) == 2 and all(is_int(r, 1) for r in pair):
            return self.feasible(layer, *pair)[:2]
        raise ValueError(
            f"ranks: layer {name!r} ({o}x{i} channels) needs (r_out, r_in) ints >= 1 or one int, got {rank!r}"
        )

    def fit(self, method: str, layer: nn.Conv2d, stats: GramStats | None, rank, ridge_kw: dict):
        from tensorpress.compress.conv import fit_tucker_conv

        return fit_tucker_conv(layer, None if method == "svd" else stats, rank, **ridge_kw)

    def macs_per_row(self, layer: nn.Conv2d, module: nn.Module) -> int:
        return self.params(layer, *cast("TuckerConv2d", module).ranks) - layer.out_channels

    def report_rank(self, fit):
        return tuple(fit.module.ranks)


class CP(_ConvStructure):
    name = "cp"
    # rank rules measure the CP ladder only while it pays (structured_rules.stops_paying)
    caps_flat_curves = True

    @staticmethod
    def params(layer: nn.Conv2d, rank: int) -> int:
        kh, kw = layer.kernel_size
        return rank * (layer.in_channels + layer.out_channels + kh + kw) + layer.out_channels

    def uniform_rank(self, layer: nn.Conv2d, budget: float):
        kh, kw = layer.kernel_size
        per = layer.in_channels + layer.out_channels + kh + kw
        return max(1, int((budget * (layer.weight.numel() + layer.out_channels) - layer.out_channels) // per))

    def rank_params(self, layer: nn.Conv2d, rank: int) -> int:
        return self.params(layer, rank)

    def rank_dof(self, layer: nn.Conv2d, rank: int) -> int:
        """CP parameters less each component's three scale indeterminacies, plus the bias."""
        from tensorpress.rank.regressors import cp_degrees_of_freedom

        return cp_degrees_of_freedom(rank, tuple(layer.weight.shape)) + layer.out_channels

    def check_rank(self, name: str, layer: nn.Conv2d, rank):
        if is_int(rank, 1):
            return rank
        raise ValueError(f"ranks: layer {name!r} needs a CP rank (an int >= 1), got {rank!r}")

    def fit(self, method: str, layer: nn.Conv2d, stats: GramStats | None, rank, ridge_kw: dict):
        from tensorpress.compress.conv import fit_cp_conv

        return fit_cp_conv(layer, None if method == "svd" else stats, rank, **ridge_kw)

    def macs_per_row(self, layer: nn.Conv2d, module: nn.Module) -> int:
        return self.params(layer, cast("CPConv2d", module).rank) - layer.out_channels

    def report_rank(self, fit) -> int:
        return fit.module.rank


@runtime_checkable
class StructureAdapter(Protocol):
    """What compress() asks of a structure: eligibility, budget -> rank, rank checks and
    counts, the fit (weights only, or from calibration statistics), the replacing module and
    what the report shows. Every adapter in ADAPTERS implements all of it."""

    name: str
    methods: tuple[str, ...]

    def why_not(self, module: nn.Module) -> str | None: ...
    def eligible(self, module: nn.Module) -> bool: ...
    def describe(self) -> str: ...
    def uniform_rank(self, layer: Any, budget: float) -> Any: ...
    def rank_params(self, layer: Any, rank: Any) -> int: ...
    def rank_dof(self, layer: Any, rank: Any) -> int: ...
    def check_rank(self, name: str, layer: Any, rank: Any) -> Any: ...
    def fit(self, method: str, layer: Any, stats: GramStats | None, rank: Any, ridge_kw: dict) -> Any: ...
    def module(self, layer: Any, fit: Any) -> nn.Module: ...
    def macs_per_row(self, layer: Any, module: nn.Module) -> int: ...
    def report_rank(self, fit: Any) -> Any: ...


ADAPTERS: dict[str, StructureAdapter] = {s.name: s for s in (LowRank(), TT(), Tucker(), CP())}
STRUCTURES = tuple(ADAPTERS)


def weight_matrix(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as the (out, features) matrix its calibration rows multiply."""
    w = cast(torch.Tensor, layer.weight).detach()
    return w.reshape(w.shape[0], -1) if w.dim() > 2 else w


def layer_bias(layer: nn.Module) -> torch.Tensor | None:
    """The layer's bias, detached, or None when it has none."""
    b = getattr(layer, "bias", None)
    return b.detach() if isinstance(b, torch.Tensor) else None


def budget_params(layer: nn.Module) -> int:
    """The layer's weights plus a bias: what a budget fraction of a tensor-structured layer is
    taken of (every fit has a bias)."""
    weight = cast(torch.Tensor, layer.weight)
    return weight.numel() + weight.shape[0]


def module_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def dense_macs_per_row(layer: nn.Module) -> int:
    return math.prod(weight_matrix(layer).shape)
