"""Folding a BatchNorm into the conv before it: compress(..., fold_batchnorm=True).

In eval mode a BatchNorm2d is a per-channel affine map of its input, y = (x - mean) s + beta
with s = gamma / sqrt(var + eps) from its running statistics, so the conv that feeds it absorbs
it: W'[o] = s_o W[o], b' = (b - mean) s + beta (torch.nn.utils.fusion.fuse_conv_bn_weights,
computed in float64). compress() then fits the folded conv, so the fit weighs each output
channel as the layers after the BatchNorm see it, and a FoldedBatchNorm (an nn.Identity that
names its conv) takes the BatchNorm's place: the model computes the same function in eval mode.

Which pairs: a BatchNorm2d (or SyncBatchNorm) whose input is the very tensor a Conv2d returned,
each called once per pass, found by forward hooks on the first calibration batch (the project
does not use torch.fx; hooks also see custom forwards such as a ResNet block's bn1(conv1(x))).
Without calibration batches (method="svd", calib=None) only a BatchNorm2d right after a Conv2d
in an nn.Sequential (whose own forward runs one into the other) is folded. Only the convs that
compress() fits get their BatchNorm folded; the others keep theirs, listed in the report's notes
with the reason.

With a calibration batch, the folded model's output is checked against the original's on it:
a conv whose output is also used elsewhere (y = conv(x); bn(y) + y) or changed in place before
the BatchNorm would change it, and such a pair is left unfolded (noted). A BatchNorm in training
mode normalizes by each batch's statistics, not the running ones folding uses: compress()
refuses to fold it (ValueError) rather than change what the model computes.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from tensorpress.compress.calibrate import call_model, hooks, naming_batch
from tensorpress.compress.shared import module_names, swap_module

# the BatchNorm types folded (exact types: a subclass's forward may do more)
BATCHNORMS = (nn.BatchNorm2d, nn.SyncBatchNorm)
# largest relative change of the model's output the folding may cause on the check batch (it
# only rounds differently; a wrong fold changes the output by the BatchNorm's whole effect)
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4}
TOLERANCE_16BIT = 1e-2


class FoldedBatchNorm(nn.Identity):
    """Where compress(fold_batchnorm=True) folded a BatchNorm into the conv ``conv`` before it:
    the identity (the conv's weight and bias now apply the BatchNorm's affine map)."""

    def __init__(self, conv: str = "", num_features: int = 0) -> None:
        super().__init__()
        self.conv, self.num_features = conv, num_features

    def extra_repr(self) -> str:
        return f"{self.num_features}, folded into {self.conv!r}"


@dataclass
class Folding:
    """fold_batchnorms' result: the model to compress (a folded copy, or the model itself
    when nothing was folded), {BatchNorm name: conv name} folded, and the BatchNorms that
    directly follow a conv but were left as they are, with the reason."""

    model: nn.Module
    folded: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def fold_batchnorms(
    model: nn.Module, targets: Sequence[str], not_fitted: Mapping[str, str], batch=None, position: int = 0
) -> Folding:
    """Fold every eval-mode BatchNorm that directly follows one of the convs ``targets`` (the
    layers compress() fits) into it, in a copy of ``model`` (see the module docstring); the
    model is copied only when there is something to fold, and left as it was.
    ``not_fitted``: why each other conv is not fitted (for the notes); ``batch``: the first
    calibration batch (found pairs and the output check; None: nn.Sequential adjacency only),
    ``position`` its index in calib (for error messages)."""
    names = {i: n[0] for i, n in module_names(model).items()}
    aliased = {i for i, n in module_names(model).items() if len(n) > 1}
    with _inferring(model) as flags:  # the pass as the model infers (dropout off), flags put back
        pairs, reference = (
            (_sequential_pairs(model), None) if batch is None else _dataflow_pairs(model, batch, position)
        )
    notes, chosen = [], []
    if not pairs:
        where = "reads a conv's output directly" if batch is not None else "follows a Conv2d in an nn.Sequential"
        notes.append(f"fold_batchnorm: no BatchNorm2d of the model {where}: nothing folded")
    for conv, bn in pairs:
        conv_name, bn_name = names[id(conv)], names[id(bn)]
        why = _why_not(conv, bn, conv_name, targets, not_fitted, aliased)
        if why is not None:
            notes.append(f"fold_batchnorm: {type(bn).__name__} {bn_name!r} after conv {conv_name!r} not folded: {why}")
        elif flags[id(bn)]:
            raise ValueError(
                f"fold_batchnorm: {type(bn).__name__} {bn_name!r} (after conv {conv_name!r}) is in "
                f"training mode: it normalizes by each batch's statistics, and folding uses its running "
                f"statistics; call model.eval() first, or leave fold_batchnorm=False"
            )
        else:
            chosen.append((conv_name, bn_name))
    if not chosen:
        return Folding(model, {}, notes)
    work = copy.deepcopy(model)
    with _inferring(work):  # a FoldedBatchNorm stands for an eval-mode BatchNorm: its flag stays False
        kept = _fold_checked(
            work,
            [(work.get_submodule(c), work.get_submodule(b), c, b) for c, b in chosen],
            batch,
            position,
            reference,
            notes,
        )
    if not kept:
        return Folding(model, {}, notes)
    return Folding(work, {bn_name: conv_name for _, _, conv_name, bn_name in kept}, notes)


@contextmanager
def _inferring(model: nn.Module):
    """``model`` in eval mode inside the block, every module's own training flag (yielded,
    by id) put back after it; modules added inside it (a FoldedBatchNorm) keep eval mode."""
    flags = {id(m): m.training for m in model.modules()}
    try:
        model.eval()
        yield flags
    finally:
        for m in model.modules():
            m.training = flags.get(id(m), False)


def _why_not(
    conv: nn.Module,
    bn: nn.Module,
    conv_name: str,
    targets: Sequence[str],
    not_fitted: Mapping[str, str],
    aliased: set[int],
) -> str | None:
    """Why a conv -> BatchNorm pair is not folded (None: fold it)."""
    if conv_name not in targets:
        return f"the conv is not compressed ({not_fitted.get(conv_name, 'not a target')})"
    if bn.running_mean is None or bn.running_var is None:
        return "it normalizes by batch statistics (track_running_stats=False): nothing fixed to fold"
    if id(conv) in aliased or id(bn) in aliased:
        return "the conv or the BatchNorm is registered at several places in the model"
    return None


def _sequential_pairs(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """(conv, BatchNorm) pairs side by side in an nn.Sequential (its own forward, not a
    subclass's), each conv once."""
    pairs: list[tuple[nn.Module, nn.Module]] = []
    seen: set[int] = set()
    for seq in model.modules():
        if type(seq) is not nn.Sequential:
            continue
        children = list(seq._modules.values())
        for conv, bn in zip(children, children[1:]):
            if type(conv) is nn.Conv2d and type(bn) in BATCHNORMS and id(conv) not in seen:
                seen.add(id(conv))
                pairs.append((conv, bn))
    return pairs


def _dataflow_pairs(model: nn.Module, batch, position: int) -> tuple[list[tuple[nn.Module, nn.Module]], object]:
    """((conv, BatchNorm) pairs, the model's output) from one pass on ``batch``: each
    BatchNorm called once on the very tensor a conv called once returned."""
    convs = [m for m in model.modules() if type(m) is nn.Conv2d]
    bns = [m for m in model.modules() if type(m) in BATCHNORMS]
    if not convs or not bns:
        return [], None
    calls: dict[int, int] = {}
    outputs: dict[int, weakref.ref] = {}  # conv -> its output (weak: nothing kept alive)
    fed_by: dict[int, nn.Module] = {}  # BatchNorm -> the conv whose output it read
    by_id = {id(c): c for c in convs}

    def conv_hook(mod, _args, out):
        calls[id(mod)] = calls.get(id(mod), 0) + 1
        if isinstance(out, Tensor):
            outputs[id(mod)] = weakref.ref(out)

    def bn_hook(mod, args):
        calls[id(mod)] = calls.get(id(mod), 0) + 1
        x = args[0] if args else None
        src = next((i for i, ref in outputs.items() if x is not None and ref() is x), None)
        if src is not None:
            fed_by[id(mod)] = by_id[src]

    handles = [c.register_forward_hook(conv_hook) for c in convs] + [b.register_forward_pre_hook(bn_hook) for b in bns]
    with hooks(handles), naming_batch(position), torch.no_grad():
        out = call_model(model, batch)
    pairs = [
        (fed_by[id(b)], b)
        for b in bns
        if id(b) in fed_by and calls.get(id(b)) == 1 and calls.get(id(fed_by[id(b)])) == 1
    ]
    return pairs, out


def _f64(t: Tensor) -> Tensor:
    return t.detach().to(torch.float64)


def _f64_or_none(t: Tensor | None) -> Tensor | None:
    return None if t is None else _f64(t)


def _fold_pair(model: nn.Module, conv: nn.Conv2d, bn: nn.Module, conv_name: str) -> Callable[[], None]:
    """Fold ``bn`` into ``conv`` inside ``model`` (a FoldedBatchNorm in its place); returns
    the undo."""
    old_weight, old_bias = conv.weight, conv.bias
    # a BatchNorm2d's attributes (nn.Module's attribute type is too loose); its running
    # statistics are tensors: _why_not leaves out the BatchNorms without them
    running_mean, running_var = cast(Tensor, bn.running_mean), cast(Tensor, bn.running_var)
    gamma, beta = cast("Tensor | None", bn.weight), cast("Tensor | None", bn.bias)
    weight, bias = fuse_conv_bn_weights(
        _f64(conv.weight),
        _f64_or_none(conv.bias),
        _f64(running_mean),
        _f64(running_var),
        cast(float, bn.eps),
        _f64_or_none(gamma),
        _f64_or_none(beta),
    )
    conv.weight = nn.Parameter(weight.detach().to(old_weight.dtype), old_weight.requires_grad)
    conv.bias = nn.Parameter(
        bias.detach().to(old_weight.dtype if old_bias is None else old_bias.dtype),
        old_weight.requires_grad if old_bias is None else old_bias.requires_grad,
    )
    marker = FoldedBatchNorm(conv_name, cast(int, bn.num_features))
    swap_module(model, bn, marker)

    def undo():
        conv.weight, conv.bias = old_weight, old_bias
        swap_module(model, marker, bn)

    return undo


def _fold_checked(model: nn.Module, chosen: list, batch, position: int, reference, notes: list[str]) -> list:
    """Fold the ``chosen`` pairs; with a batch, keep only the folds that leave the model's
    output as it was (all at once, else one by one). Returns the pairs folded."""
    undo = [_fold_pair(model, conv, bn, cn) for conv, bn, cn, _ in chosen]
    if batch is None or not chosen or _change(model, batch, position, reference) <= _tolerance(reference):
        return chosen
    for u in reversed(undo):
        u()
    kept = []
    for conv, bn, conv_name, bn_name in chosen:
        u = _fold_pair(model, conv, bn, conv_name)
        change = _change(model, batch, position, reference)
        if change <= _tolerance(reference):
            kept.append((conv, bn, conv_name, bn_name))
        else:
            u()
            notes.append(
                f"fold_batchnorm: {type(bn).__name__} {bn_name!r} after conv {conv_name!r} not folded: "
                f"folding it changed the model's output on calib[{position}] by {change:.2e} (relative): "
                f"the conv's output is also used elsewhere, or changed before the BatchNorm reads it"
            )
    return kept


def _float_tensors(out) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in _float_tensors(item)]
    return []


def _change(model: nn.Module, batch, position: int, reference) -> float:
    """||output - reference|| / ||reference|| over the floating tensors of the output."""
    with naming_batch(position), torch.no_grad():
        got = _float_tensors(call_model(model, batch))
    ref = _float_tensors(reference)
    if len(got) != len(ref) or any(a.shape != b.shape for a, b in zip(got, ref)):
        return float("inf")
    err = sum((a.to(torch.float64) - b.to(torch.float64)).square().sum().item() for a, b in zip(got, ref))
    energy = sum(b.to(torch.float64).square().sum().item() for b in ref)
    return (err / max(energy, 1e-300)) ** 0.5


def _tolerance(reference) -> float:
    tensors = _float_tensors(reference)
    return TOLERANCE.get(tensors[0].dtype, TOLERANCE_16BIT) if tensors else float("inf")
