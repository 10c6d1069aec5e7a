"""Feeding calibration batches through a model and recording target layers' inputs.

Batches are whatever the model takes: a Mapping is passed as keyword arguments, a tuple or
list as positional arguments, anything else as the single argument. When a Mapping batch has
an ``attention_mask`` of shape (B, T) and a layer's input has leading shape (B, T), only the
rows where the mask is nonzero are recorded (padding tokens are not calibration data).

A layer may be called several times in one pass (a module applied twice, or registered at two
places): the hooks record every call, and the statistics of such a layer cover all of them.

Every hook is registered inside a ``with`` block, so hooks are removed even when a pass fails.
An error the model raises on a calibration batch is re-raised as a CalibrationBatchError naming
the batch's position in the caller's ``calib`` list (the original error chained).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager
from typing import cast

import torch
from torch import Tensor, nn

from tensorpress.nn.patches import conv_patches, im2col


class StopForward(Exception):
    """Raised by a hook to end a forward pass once everything needed was recorded."""


class CalibrationBatchError(ValueError):
    """The model failed on one calibration batch; the message names it as calib[i]."""


# errors that say nothing about the batch: passed on as they are
_NOT_THE_BATCH = (StopForward, CalibrationBatchError, MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))


@contextmanager
def naming_batch(index: int):
    """Re-raise an error of the model on calibration batch ``index`` (its position in the
    caller's calib list) as a CalibrationBatchError saying which batch it was."""
    try:
        yield
    except _NOT_THE_BATCH:
        raise
    except Exception as err:
        raise CalibrationBatchError(
            f"calib[{index}]: the model cannot run on this calibration batch ({type(err).__name__}: {err})"
        ) from err


def call_model(model: nn.Module, batch) -> object:
    """Run ``model`` on one batch by the convention in the module docstring."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def row_mask(batch) -> Tensor | None:
    """The (B, T) boolean mask of real tokens of a Mapping batch, if it has one."""
    if isinstance(batch, Mapping):
        mask = batch.get("attention_mask")
        if isinstance(mask, Tensor) and mask.dim() == 2:
            return mask.bool()
    return None


def rows(x: Tensor, mask: Tensor | None) -> Tensor:
    """x (..., features) as (rows, features), masked rows dropped when the mask fits."""
    if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask.to(x.device)]
    return x.reshape(-1, x.shape[-1])


def row_signature(layer: nn.Module) -> tuple:
    """Layers with equal signatures turn the same input tensor into the same rows."""
    if isinstance(layer, nn.Conv2d):
        return (
            "conv2d",
            layer.in_channels,
            layer.kernel_size,
            layer.stride,
            layer.padding,
            layer.dilation,
            layer.padding_mode,
        )
    return ("linear", layer.in_features)


def layer_features(layer: nn.Module) -> int:
    """The length of one calibration row of ``layer``: in_features, or in_channels * kh * kw
    for a Conv2d (one row per output position: the input patch it sees)."""
    if isinstance(layer, nn.Conv2d):
        return layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1]
    return cast(int, layer.in_features)


def layer_rows(layer: nn.Module, x: Tensor, mask: Tensor | None) -> Tensor:
    """The calibration rows of ``layer`` for its input ``x`` (see :func:`layer_features`)."""
    if isinstance(layer, nn.Conv2d):
        return conv_patches(layer, x)
    return rows(x, mask)


def _conv_positions(conv: nn.Conv2d, x: Tensor) -> int:
    """Output positions per sample (H_out * W_out) of ``conv`` on x (..., H, W)."""
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        pad = conv._reversed_padding_repeated_twice  # (left, right, top, bottom)
        sizes = (x.shape[-2] + pad[2] + pad[3], x.shape[-1] + pad[0] + pad[1])
    else:
        sizes = (x.shape[-2] + 2 * conv.padding[0], x.shape[-1] + 2 * conv.padding[1])
    out = 1
    for size, k, s, d in zip(sizes, conv.kernel_size, conv.stride, conv.dilation):
        out *= max(0, (size - d * (k - 1) - 1) // s + 1)
    return out


def layer_row_count(layer: nn.Module, x: Tensor, mask: Tensor | None) -> int:
    """The number of rows layer_rows(layer, x, mask) has, without forming them."""
    if isinstance(layer, nn.Conv2d):
        return (1 if x.dim() == 3 else x.shape[0]) * _conv_positions(layer, x)
    if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return int(mask.sum())
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


def layer_row_chunks(layer: nn.Module, x: Tensor, mask: Tensor | None, max_rows: int | None):
    """layer_rows(layer, x, mask) in consecutive chunks of at most ``max_rows`` rows (a conv's
    patches are unfolded a few samples at a time, or a few output rows of one sample at a
    time), so the rows of a whole batch are never formed at once. ``max_rows`` None: one chunk."""
    if max_rows is None:
        yield layer_rows(layer, x, mask)
        return
    if isinstance(layer, nn.Conv2d):
        if x.dim() == 3:
            x = x.unsqueeze(0)
        positions = _conv_positions(layer, x)
        per = max_rows // max(1, positions)
        if per >= 1:
            for i in range(0, x.shape[0], per):
                yield conv_patches(layer, x[i : i + per])
            return
        yield from _output_row_chunks(layer, x, max_rows)
        return
    r = rows(x, mask)
    for i in range(0, r.shape[0], max_rows):
        yield r[i : i + max_rows]


def _output_row_chunks(conv: nn.Conv2d, x: Tensor, max_rows: int):
    """The patches of each sample a block of output rows at a time (at least one row)."""
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    for n in range(x.shape[0]):
        xp = x[n : n + 1]
        if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
            mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
            xp = torch.nn.functional.pad(xp, conv._reversed_padding_repeated_twice, mode=mode)
        else:
            xp = torch.nn.functional.pad(xp, (conv.padding[1], conv.padding[1], conv.padding[0], conv.padding[0]))
        h_out = (xp.shape[-2] - dh * (kh - 1) - 1) // sh + 1
        w_out = (xp.shape[-1] - dw * (kw - 1) - 1) // sw + 1
        if h_out <= 0 or w_out <= 0:
            continue
        block = max(1, max_rows // w_out)
        for h0 in range(0, h_out, block):
            h1 = min(h_out, h0 + block)
            part = xp[..., h0 * sh : (h1 - 1) * sh + dh * (kh - 1) + 1, :]
            yield im2col(part, (kh, kw), (sh, sw), 0, (dh, dw))


@contextmanager
def hooks(handles: list):
    """Remove every handle in ``handles`` on exit (also on error)."""
    try:
        yield handles
    finally:
        for h in handles:
            h.remove()
        handles.clear()


def record_inputs(
    module_of: Mapping[str, nn.Module], on_input: Callable[[str, Tensor], None], stop_after: Sequence[str] = ()
) -> list:
    """Register pre-hooks that call on_input(name, input) for each named module; once every
    module in ``stop_after`` has fired in a pass, raise StopForward. Returns the handles (use
    within :func:`hooks`)."""
    fired: set[str] = set()
    need = set(stop_after)

    def make(name):
        def hook(_mod, args):
            if not args or not isinstance(args[0], Tensor):
                raise TypeError(
                    f"layer {name!r}: expected a tensor as its first input, got "
                    f"{type(args[0]).__name__ if args else 'nothing'}"
                )
            on_input(name, args[0])
            if need:
                fired.add(name)
                if need <= fired:
                    fired.clear()
                    raise StopForward

        return hook

    return [m.register_forward_pre_hook(make(n)) for n, m in module_of.items()]


def run_until_stop(fn: Callable[[], object]) -> object | None:
    """Call fn(); a StopForward ends it early (returns None)."""
    try:
        with torch.no_grad():
            return fn()
    except StopForward:
        return None


def trace_calls(
    run: Callable[[], object], targets: Mapping[str, nn.Module], scopes: Sequence[nn.Module] = ()
) -> list[tuple[str, Tensor, int | None]]:
    """(name, input, scope) of every call of a target layer in one pass (``run()``), in order;
    scope: the index in ``scopes`` of the innermost scope module running at that call (e.g.
    the block of a transformer), or None. Each scope module must appear once in ``scopes``."""
    calls: list[tuple[str, Tensor, int | None]] = []
    running: list[int] = []

    def enter(i):
        def hook(_mod, _args):
            running.append(i)

        return hook

    def leave(_mod, _args, _out):
        running.pop()

    handles = record_inputs(targets, lambda n, x: calls.append((n, x, running[-1] if running else None)))
    for i, scope in enumerate(scopes):
        handles += [scope.register_forward_pre_hook(enter(i)), scope.register_forward_hook(leave)]
    with hooks(handles):
        run_until_stop(run)
    return calls


def call_counts(calls: Sequence[tuple]) -> dict[str, int]:
    """{name: calls in the pass} of trace_calls' record."""
    counts: dict[str, int] = {}
    for name, *_ in calls:
        counts[name] = counts.get(name, 0) + 1
    return counts


def group_stages(calls: Sequence[tuple], targets: Mapping[str, nn.Module]) -> list[list[str]]:
    """Target layers in the order of their first call (trace_calls' record), grouped into
    stages: layers called once each, one after another with the very same input tensor (q, k,
    v of attention) and the same row signature share a stage, since compressing one does not
    change the others' inputs. A layer called several times has a stage of its own (its later
    calls read other tensors)."""
    counts = call_counts(calls)
    stages: list[list[str]] = []
    seen: set[str] = set()
    last, last_shared = None, False
    for name, x, *_ in calls:
        if name in seen:
            continue
        seen.add(name)
        shareable = counts[name] == 1
        if (
            stages
            and shareable
            and last_shared
            and x is last
            and row_signature(targets[name]) == row_signature(targets[stages[-1][0]])
        ):
            stages[-1].append(name)
        else:
            stages.append([name])
        last, last_shared = x, shareable
    return stages


def execution_order(run: Callable[[], object], targets: Mapping[str, nn.Module]) -> list[list[str]]:
    """Target layers in the order one forward pass (``run()``) reaches them, grouped into
    stages (see group_stages). Layers the pass never reaches are left out."""
    # the input tensors themselves are kept until the grouping is done: comparing addresses
    # of tensors already freed could match a new tensor allocated at the same place
    return group_stages(trace_calls(run, targets), targets)


def find_blocks(model: nn.Module, targets: Iterable[str]) -> tuple[str, nn.ModuleList | nn.Sequential] | None:
    """The repeated-block container holding the most target layers (a ModuleList or
    Sequential of at least two modules, e.g. a transformer's layers), or None."""
    targets = list(targets)
    best: tuple[str, nn.ModuleList | nn.Sequential] | None = None
    best_count = 0
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.ModuleList, nn.Sequential)) or len(mod) < 2:
            continue
        prefix = f"{name}." if name else ""
        count = sum(1 for t in targets if t.startswith(prefix))
        if count > best_count:
            best, best_count = (name, mod), count
    return best


NORMS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.RMSNorm)


def residual_partners(model: nn.Module, targets: Mapping[str, nn.Module], batch) -> dict[str, str]:
    """{layer name: its parent's name} for the target layers that end a post-norm residual
    branch: the parent is called as parent(h, residual, ...) and feeds norm(layer(...) + residual)
    to a normalization child (BERT's "output" blocks). Checked numerically on ``batch``: the
    norm's input must equal the layer's output plus the parent's second argument.

    For such a layer, the compressed model's residual differs from the original's by an error
    D the layer's output can make up for, so its fit may aim at X W^T + b + D instead of
    X W^T + b (see OffsetStats)."""
    parents = {}
    for name in targets:
        parent_name = name.rpartition(".")[0]
        if parent_name:
            parents[name] = parent_name
    if not parents:
        return {}
    seen_args: dict[str, tuple] = {}
    seen_out: dict[str, Tensor] = {}
    seen_norm: dict[str, list] = {}
    handles = []

    def on_parent(pname):
        def hook(_mod, args, kwargs):
            seen_args.setdefault(pname, tuple(args))

        return hook

    def on_layer(name):
        def hook(_mod, _args, out):
            if isinstance(out, Tensor):
                seen_out.setdefault(name, out)

        return hook

    def on_norm(pname):
        def hook(_mod, args):
            if args and isinstance(args[0], Tensor):
                seen_norm.setdefault(pname, []).append(args[0])

        return hook

    for name, pname in parents.items():
        parent = model.get_submodule(pname)
        handles.append(parent.register_forward_pre_hook(on_parent(pname), with_kwargs=True))
        handles.append(targets[name].register_forward_hook(on_layer(name)))
        for child in parent.children():
            if isinstance(child, NORMS):
                handles.append(child.register_forward_pre_hook(on_norm(pname)))
    with hooks(handles):
        run_until_stop(lambda: call_model(model, batch))
    found = {}
    for name, pname in parents.items():
        args, out = seen_args.get(pname, ()), seen_out.get(name)
        if out is None or len(args) < 2 or not isinstance(args[1], Tensor) or args[1].shape != out.shape:
            continue
        if any(
            x.shape == out.shape and torch.allclose(x, out + args[1], rtol=1e-4, atol=1e-5)
            for x in seen_norm.get(pname, [])
        ):
            found[name] = pname
    return found
