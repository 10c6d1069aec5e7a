"""Every layer accounted for: which nn.Linear / conv layers of a model compress() replaced, kept
dense, skipped or left out at the user's request, and why (CompressionReport.account).

The structures' own filters (structures.py, ``why_not``) give the reasons a layer cannot be
replaced; the include/exclude patterns, tied weights and the rank rule add theirs here."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence

from torch import nn

from tensorpress.compress.report import COMPRESSED, EXCLUDED, KEPT_DENSE, SKIPPED, LayerAccount, LayerReport

# the layer types the account lists: what the structures replace, and the other convolutions
# (Conv1d, Conv3d, transposed) a user may expect to be compressed
ACCOUNTED = (nn.Linear, nn.modules.conv._ConvNd)


def accounted_layers(model: nn.Module) -> dict[str, nn.Module]:
    """{first name: module} of every nn.Linear / conv layer of ``model`` (subclasses too), in
    model order, a module registered under several names once."""
    return {name: mod for name, mod in model.named_modules() if isinstance(mod, ACCOUNTED)}


def layer_kind(module: nn.Module) -> str:
    """A short description of the layer: "Linear(16->10)", "Conv2d(8->8, 3x3, groups=8)"."""
    kind = type(module).__name__
    if isinstance(module, nn.Linear):
        return f"{kind}({module.in_features}->{module.out_features})"
    if isinstance(module, nn.modules.conv._ConvNd):
        kernel = "x".join(str(k) for k in module.kernel_size)
        groups = f", groups={module.groups}" if module.groups > 1 else ""
        return f"{kind}({module.in_channels}->{module.out_channels}, {kernel}{groups})"
    return kind


def _first_match(names: Sequence[str], patterns: Sequence[str]) -> str | None:
    return next((p for p in patterns for n in names if n == p or fnmatch.fnmatchcase(n, p)), None)


def user_choice(names: Sequence[str], include: Sequence[str], exclude: Sequence[str]) -> str | None:
    """Why the user's include/exclude patterns leave out a layer known by ``names`` (None when
    they keep it): a pattern matching any of its names counts."""
    if include and _first_match(names, include) is None:
        return f"matches no include pattern of {list(include)}"
    hit = _first_match(names, exclude)
    return None if hit is None else f"matches exclude pattern {hit!r}"


def screen(
    model: nn.Module, why_not, names_of: Mapping[int, list[str]], include: Sequence[str], exclude: Sequence[str]
) -> tuple[list[str], dict[str, tuple[str, str]]]:
    """(names of the layers to compress, {layer left out: (status, why)}) over every
    nn.Linear / conv layer; ``why_not(module)`` is the structure's reason a layer cannot be
    replaced, or None. A layer the structure cannot replace is skipped for that reason even if
    the user's patterns also leave it out."""
    targets, left_out = [], {}
    for name, mod in accounted_layers(model).items():
        reason = why_not(mod)
        if reason is not None:
            left_out[name] = (SKIPPED, reason)
            continue
        choice = user_choice(names_of[id(mod)], include, exclude)
        if choice is not None:
            left_out[name] = (EXCLUDED, choice)
        else:
            targets.append(name)
    return targets, left_out


def dense_reason(name: str, ranks: Mapping | None, rank_rule: str | None) -> str:
    """Why a targeted layer got no rank (chosen rank None)."""
    if ranks is not None:
        return f"ranks[{name!r}] is None"
    if rank_rule is not None:
        return (
            f"rank_rule={rank_rule!r} kept it whole: its estimated error at every lower rank cost more "
            f"than the parameters it would save elsewhere under the budget"
        )
    return "the budget keeps the whole layer"


def compressed_reason(r: LayerReport) -> str:
    return (
        f"{r.structure} rank {r.rank_text}: {r.params_before:,} -> {r.params_after:,} parameters "
        f"({100 * r.params_after / max(r.params_before, 1):.1f}% kept)"
    )


def build_account(
    model: nn.Module,
    names_of: Mapping[int, list[str]],
    left_out: Mapping[str, tuple[str, str]],
    tied: Mapping[str, str],
    done: Sequence[LayerReport],
    dense_why: Mapping[str, str],
) -> list[LayerAccount]:
    """One LayerAccount per nn.Linear / conv layer of ``model`` (in model order): from the
    screening (``left_out``), the layers kept dense for their tied weights (``tied``) and the
    report's rows of the layers fitted (``done``; ``dense_why``: why a layer was kept dense)."""
    reports = {r.name: r for r in done}
    out = []
    for name, mod in accounted_layers(model).items():
        if name in left_out:
            status, why = left_out[name]
        elif name in tied:
            status, why = SKIPPED, tied[name]
        elif name in reports and reports[name].structure == "dense":
            status, why = KEPT_DENSE, dense_why.get(name, "kept dense")
        elif name in reports:
            status, why = COMPRESSED, compressed_reason(reports[name])
        else:  # compress() reports every target; a gap here is a bug, and must show
            raise RuntimeError(f"compress: layer {name!r} was neither fitted nor left out; please report this")
        out.append(
            LayerAccount(name=name, kind=layer_kind(mod), status=status, why=why, aliases=list(names_of[id(mod)][1:]))
        )
    return out
