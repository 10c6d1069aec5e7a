"""Sequential layer-by-layer compression: each layer is fitted on the inputs of the model
compressed so far (X~) paired with those of the original (X).

When the target layers live in a stack of repeated blocks (a transformer's layers, a
Sequential), the blocks' inputs are cached once per calibration batch and each stage replays
one block only, not the whole model: the cost of the calibration passes drops by about the
number of blocks. The replay is checked against a real forward pass on the first batch and
the engine falls back to whole-model passes when it does not match (a block whose inputs are
not "the previous block's output + the same keyword arguments").

A layer called several times per pass is fitted on the rows of all its calls (paired call by
call; its later calls' X~ are those of the model before this layer's own replacement). The
block replay is used only when every call of a layer inside a block happens while that block
runs: a layer shared across blocks switches the engine to whole-model passes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from functools import partial
from typing import cast

import torch
from torch import Tensor, nn

from tensorpress.compress.calibrate import (
    StopForward,
    call_counts,
    call_model,
    execution_order,
    find_blocks,
    group_stages,
    hooks,
    layer_features,
    layer_row_chunks,
    layer_row_count,
    naming_batch,
    record_inputs,
    residual_partners,
    row_mask,
    rows,
    run_until_stop,
    trace_calls,
)
from tensorpress.compress.memory import narrows
from tensorpress.compress.shared import swap_module
from tensorpress.compress.stats import GramStats, OffsetStats
from tensorpress.compress.structures import weight_matrix

# the original model's calibration rows kept in a shared cache, at most this many bytes (the
# rows of every stage of MiniLM-L6 on 1,000 sentences take about 2 GB); the stages beyond it
# replay the original model in every call
REF_ROWS_BYTES = 3 << 30

# fit(name, stats, offset) -> the module that replaces layer `name` in the compressed model;
# offset: OffsetStats of the residual error the layer should also make up for, or None
FitLayer = Callable[[str, GramStats, "OffsetStats | None"], nn.Module]


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _call(block: nn.Module, inputs) -> object:
    args, kwargs = inputs
    return block(*args, **kwargs)


def _next_inputs(output, inputs):
    """The next block's inputs: this block's (first) output replaces the first argument."""
    hidden = output if isinstance(output, Tensor) else output[0]
    args, kwargs = inputs
    return (hidden,) + tuple(args[1:]), kwargs


class _BlockStack:
    """Block inputs cached per batch for the reference and the compressed model."""

    def __init__(self, prefix: str, ref_blocks: nn.Module, cmp_blocks: nn.Module, batches: Sequence):
        self.prefix, self.ref_blocks, self.cmp_blocks = prefix, ref_blocks, cmp_blocks
        self.batches = batches

    @staticmethod
    def capture_first_inputs(
        model: nn.Module, first_block: nn.Module, batches: Sequence, position: Callable[[int], int] = int
    ) -> list:
        captured = []

        def hook(_mod, args, kwargs):
            captured.append((tuple(args), dict(kwargs)))
            raise StopForward

        handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
        with hooks([handle]):
            for b, batch in enumerate(batches):
                with naming_batch(position(b)):
                    run_until_stop(partial(call_model, model, batch))
        if len(captured) != len(batches):
            raise RuntimeError("the first block was not reached by every calibration batch")
        return captured

    @staticmethod
    def replay_matches(model: nn.Module, blocks: nn.ModuleList | nn.Sequential, batch) -> bool:
        """True when replaying the blocks from the first one's captured inputs reproduces
        every block's input and the last block's output of a real forward pass."""
        seen_inputs: list[Tensor | None] = []
        seen_first: list[tuple[tuple, dict]] = []
        last_out: list[Tensor] = []

        def pre(_mod, args, kwargs):
            seen_inputs.append(args[0] if args and isinstance(args[0], Tensor) else None)
            if not seen_first:
                seen_first.append((tuple(args), dict(kwargs)))

        def post(_mod, _args, output):
            last_out.append(output if isinstance(output, Tensor) else output[0])

        handles = [b.register_forward_pre_hook(pre, with_kwargs=True) for b in blocks]
        handles.append(blocks[len(blocks) - 1].register_forward_hook(post))
        with hooks(handles), torch.no_grad():
            call_model(model, batch)
        block_inputs = [x for x in seen_inputs if x is not None]
        if len(seen_inputs) != len(blocks) or len(block_inputs) != len(seen_inputs) or not last_out:
            return False
        inputs = seen_first[0]
        with torch.no_grad():
            for i, block in enumerate(blocks):
                if not torch.allclose(inputs[0][0], block_inputs[i], rtol=1e-5, atol=1e-6):
                    return False
                out = _call(block, inputs)
                inputs = _next_inputs(out, inputs)
        return torch.allclose(inputs[0][0], last_out[-1], rtol=1e-5, atol=1e-6)


def _residual_hooks(parents: dict, got: dict) -> list:
    """Pre-hooks recording each parent's second argument (the residual) as got[layer name]."""

    def make(name):
        def hook(_mod, args, kwargs):
            got.setdefault(name, args[1])

        return hook

    return [parent.register_forward_pre_hook(make(name), with_kwargs=True) for name, parent in parents.items()]


def _stage_stats(
    stage: Sequence[str],
    ref_of: dict,
    keep_rows: int,
    reference: Mapping | None,
    projectable: Collection[str],
    plans: Mapping | None,
) -> dict[str, GramStats]:
    """{layer: its accumulator}: the layers of a stage share one, unless their plan keeps the
    statistics only through each layer's weight (Kronecker-factored), then one per layer."""
    only = ref_of[stage[0]]
    plan_of = plans or {}
    plan = plan_of.get(stage[0])
    dtype = torch.float64 if plan is None else plan.dtype
    if any(plan_of.get(n) is not None and plan_of[n].kronecker for n in stage):
        return {
            n: GramStats(
                layer_features(ref_of[n]),
                paired=True,
                reference=None if reference is None else reference.get(n),
                project=weight_matrix(ref_of[n]),
                dtype=plan_of[n].dtype,
                kronecker=plan_of[n].kronecker,
                conv=ref_of[n] if isinstance(ref_of[n], nn.Conv2d) else None,
            )
            for n in stage
        }
    project = len(stage) == 1 and stage[0] in projectable and not keep_rows and narrows(only)
    shared = GramStats(
        layer_features(only),
        paired=True,
        keep_rows=keep_rows,
        reference=None if reference is None else reference.get(stage[0]),
        project=weight_matrix(only) if project else None,
        dtype=dtype,
        conv=only if isinstance(only, nn.Conv2d) else None,
        buffer_bytes=64 << 20 if plan is None else max(plan.rows_bytes, 1 << 20),
    )
    return {name: shared for name in stage}


def _collect_stage(
    stage: Sequence[str],
    ref_of: dict,
    cmp_of: dict,
    run_ref: Callable,
    run_cmp: Callable,
    n_batches: int,
    mask_of: Callable[[int], Tensor | None],
    keep_rows: int,
    progress: Callable | None,
    reference: Mapping | None = None,
    partners: dict | None = None,
    store: dict | None = None,
    projectable: Collection[str] = (),
    repeated: bool = False,
    position: Callable[[int], int] = int,
    plans: Mapping | None = None,
) -> tuple[dict[str, GramStats], dict[str, OffsetStats]]:
    """GramStats of every layer in the stage over all batches (paired X, X~). The layers of a
    stage read the same input tensor into the same rows, so they share one accumulator.
    ``store``: a cache shared by calls on the same model and batches; the original model's
    inputs (X, and the residuals) are kept there within REF_ROWS_BYTES and reused instead of
    replaying the original model. ``projectable``: layers whose fits read X~^T X only times
    their weight (GramStats project=); used for a one-layer stage that narrows its input.
    ``repeated``: the stage's one layer is called several times per pass: every pass runs to
    its end and the rows of all calls are added, the k-th call of the original model paired
    with the k-th of the compressed one. ``position(b)``: batch b's index in the user's calib
    list (for error messages). ``plans``: {layer: memory.LayerMemory}, the representation of
    its statistics and the rows per accumulator update (the rows of a batch are formed and
    added a chunk at a time)."""
    only = ref_of[stage[0]]
    stats = _stage_stats(stage, ref_of, keep_rows, reference, projectable, plans)
    accumulators = list({id(st): st for st in stats.values()}.values())
    plan = (plans or {}).get(stage[0])
    chunk = None if plan is None else plan.chunk_rows
    paired = {n: partners[n] for n in stage if partners and n in partners}  # name -> (ref parent, cmp parent)
    offsets = {n: OffsetStats(layer_features(ref_of[n]), ref_of[n].out_features) for n in paired}
    got_ref: dict[str, list[Tensor]] = {}  # every call's input, in call order
    got_cmp: dict[str, list[Tensor]] = {}
    res_ref: dict[str, Tensor] = {}
    res_cmp: dict[str, Tensor] = {}
    stop = () if repeated else stage  # a repeated layer's later calls are needed too
    ref_handles = record_inputs({n: ref_of[n] for n in stage}, lambda n, x: got_ref.setdefault(n, []).append(x), stop)
    cmp_handles = record_inputs({n: cmp_of[n] for n in stage}, lambda n, x: got_cmp.setdefault(n, []).append(x), stop)
    # the parents' pre-hooks fire before the layers' (a parent calls its layer), so the
    # residuals are recorded before the layers' hooks end the pass
    ref_handles += _residual_hooks({n: p[0] for n, p in paired.items()}, res_ref)
    cmp_handles += _residual_hooks({n: p[1] for n, p in paired.items()}, res_cmp)

    def check_reached(got, res, b):
        for name in stage:
            if name not in got:
                raise RuntimeError(f"layer {name!r} was not reached by calibration batch {position(b)}")
            if got[name][0] is not got[stage[0]][0]:
                raise RuntimeError(
                    f"layer {name!r}: its input differs from {stage[0]!r}'s in calibration batch "
                    f"{position(b)}, though they were grouped as reading the same tensor"
                )
        for n in paired:
            if n not in res:
                raise RuntimeError(
                    f"layer {n!r}: its block's residual was not recorded in calibration batch {position(b)}"
                )

    def reference_inputs(b, mask):
        """(the stage's inputs in the original model, one per call; {layer: residual rows})."""
        key = ("ref-stage-rows", tuple(stage), tuple(paired), b)
        if store is not None and key in store:
            return store[key]
        got_ref.clear()
        res_ref.clear()
        with naming_batch(position(b)):
            run_until_stop(lambda: run_ref(b))
        check_reached(got_ref, res_ref, b)
        found = (list(got_ref[stage[0]]), {n: rows(res_ref[n], mask) for n in paired})
        if store is not None:
            size = sum(x.numel() * x.element_size() for x in found[0])
            size += sum(r.numel() * r.element_size() for r in found[1].values())
            used = store.get("ref-stage-rows-bytes", 0)
            if used + size <= REF_ROWS_BYTES:
                store[key] = found = ([x.clone() for x in found[0]], {n: r.clone() for n, r in found[1].items()})
                store["ref-stage-rows-bytes"] = used + size
        return found

    def add(b, mask, ins_ref, ins_cmp):
        """Add the rows of every call, a chunk at a time, the k-th call of each model paired."""
        name = stage[0]
        n_ref = sum(layer_row_count(only, x, mask) for x in ins_ref)
        n_cmp = sum(layer_row_count(only, x, mask) for x in ins_cmp)
        if len(ins_ref) != len(ins_cmp) or n_ref != n_cmp:
            raise RuntimeError(
                f"layer {name!r}: {n_ref} input rows in the original model, "
                f"{n_cmp} in the compressed one on calibration batch {position(b)} "
                f"(it is called a different number of times)"
            )
        if isinstance(only, nn.Conv2d):  # the accumulators form the patch rows a chunk at a time
            for x_r, x_c in zip(ins_ref, ins_cmp):
                if x_r.shape != x_c.shape:
                    raise RuntimeError(
                        f"layer {name!r}: input of shape {tuple(x_r.shape)} in the original model, "
                        f"{tuple(x_c.shape)} in the compressed one on calibration batch {position(b)}"
                    )
                if not (torch.isfinite(x_r).all() and torch.isfinite(x_c).all()):
                    raise ValueError(
                        f"layer {name!r}: calibration activations contain NaN or Inf (batch {position(b)})"
                    )
                for st in accumulators:
                    st.update_conv(x_r, x_c, chunk)
            return
        for x_r, x_c in zip(ins_ref, ins_cmp):
            for a, c in zip(layer_row_chunks(only, x_r, mask, chunk), layer_row_chunks(only, x_c, mask, chunk)):
                if a.shape != c.shape:
                    raise RuntimeError(
                        f"layer {name!r}: input rows of shape {tuple(a.shape)} in the original model, "
                        f"{tuple(c.shape)} in the compressed one on calibration batch {position(b)}"
                    )
                if not torch.isfinite(a).all():
                    raise ValueError(
                        f"layer {name!r}: calibration activations contain NaN or Inf (batch {position(b)})"
                    )
                if not torch.isfinite(c).all():
                    raise ValueError(
                        f"layer {name!r}: calibration activations contain NaN or Inf (batch {position(b)})"
                    )
                for st in accumulators:
                    st.update(a, c)
                if offsets:
                    yield c

    with hooks(ref_handles), hooks(cmp_handles):
        for b in range(n_batches):
            mask = mask_of(b)
            ins_ref, residual_ref = reference_inputs(b, mask)
            got_cmp.clear()
            res_cmp.clear()
            with naming_batch(position(b)):
                run_until_stop(partial(run_cmp, b))
            check_reached(got_cmp, res_cmp, b)
            ins_cmp = list(got_cmp[stage[0]])
            if offsets:  # residual feedback (Linear layers of post-norm blocks): rows at once
                x_cmp = torch.cat(list(add(b, mask, ins_ref, ins_cmp)))
                for n, off in offsets.items():
                    off.update(x_cmp, residual_ref[n] - rows(res_cmp[n], mask))
            else:
                for _ in add(b, mask, ins_ref, ins_cmp):
                    pass
            if progress is not None:
                progress(1)
    for st in accumulators:
        st.all_reduce_()  # sums over processes under torch.distributed; a no-op otherwise
    for off in offsets.values():
        off.all_reduce_()
    return stats, offsets


def compress_sequential(
    ref: nn.Module,
    cmp: nn.Module,
    batches: Sequence,
    targets: Sequence[str],
    fit_layer: FitLayer,
    keep_rows: int = 0,
    progress=None,
    reference: Mapping[str, GramStats] | None = None,
    cache: dict | None = None,
    residual_feedback: Sequence[str] = (),
    projectable: Collection[str] = (),
    positions: Sequence[int] | None = None,
    plans: Mapping | None = None,
) -> dict:
    """Replace every layer in ``targets`` of ``cmp`` (a copy of ``ref``) by fit_layer(name,
    stats), in execution order, each fitted on X from ``ref`` and X~ from ``cmp`` as compressed
    so far. ``progress``: an object with ``update(n)``, ``set_description(s)`` and a writable
    ``total`` (a tqdm bar), or None. ``reference``: one-shot statistics of the layers on the
    same batches, reused for their X^T X. ``cache``: a dict shared between calls on the same
    model and batches (keeps the original model's block inputs). ``residual_feedback``: layers
    that, when they end a post-norm residual branch (see residual_partners), are fitted to make
    up for the residual stream's error too (fit_layer gets their OffsetStats).
    ``projectable``: layers whose fit reads the cross statistics only through
    GramStats.cov_cross_times(their weight), which then may be all that is kept.
    ``positions``: each batch's index in the user's calib list (for error messages).
    ``plans``: {layer: memory.LayerMemory} (see _collect_stage).
    A layer is replaced under every name it is registered by (see shared.swap_module).
    Returns {"mode": "blocks"|"model", "stages": [...], "residual_feedback": [names],
    "calls": {layer: calls per pass on the first batch}, "notes": [why the block replay was
    not used, if so]}."""
    ref_of = {n: ref.get_submodule(n) for n in targets}
    cmp_of = {n: cmp.get_submodule(n) for n in targets}
    masks = [row_mask(b) for b in batches]
    position: Callable[[int], int] = _same_index if positions is None else positions.__getitem__
    done: list[list[str]] = []
    notes: list[str] = []
    tick = None if progress is None else progress.update

    def fit_stage(stage, run_ref, run_cmp):
        if progress is not None:
            progress.set_description(f"calibrating {stage[0]}" + (f" (+{len(stage) - 1})" if len(stage) > 1 else ""))
        stats, offsets = _collect_stage(
            stage,
            ref_of,
            cmp_of,
            run_ref,
            run_cmp,
            len(batches),
            masks.__getitem__,
            keep_rows,
            tick,
            reference,
            partners,
            cache,
            projectable,
            repeated=any(n in repeated for n in stage),
            position=position,
            plans=plans,
        )
        for name in stage:
            new = fit_layer(name, stats[name], offsets.get(name))
            swap_module(cmp, cmp_of[name], new)
            cmp_of[name] = new
        done.append(list(stage))

    found = find_blocks(ref, targets)
    blocks = list(found[1]) if found is not None else []
    distinct = len({id(b) for b in blocks}) == len(blocks)
    calls = trace_calls(lambda: call_model(ref, batches[0]), ref_of, blocks if distinct else ())
    order = group_stages(calls, ref_of)
    counts = call_counts(calls)
    repeated = {n for n, c in counts.items() if c > 1}
    # the residual of a repeated layer's block is not one per call: no feedback for it
    wanted = {n: ref_of[n] for n in targets if n in set(residual_feedback) and n not in repeated}
    ends = residual_partners(ref, wanted, batches[0]) if wanted else {}
    partners = {n: (ref.get_submodule(p), cmp.get_submodule(p)) for n, p in ends.items()}
    reached = [n for stage in order for n in stage]
    missing = [n for n in targets if n not in reached]
    if missing:
        raise ValueError(f"include: layers {missing} are never called by the model on the calibration data")

    def whole_model(names):
        for stage in order:
            stage = [n for n in stage if n in names]
            if stage:
                fit_stage(stage, lambda b: call_model(ref, batches[b]), lambda b: call_model(cmp, batches[b]))

    if found is not None:
        why = _replay_unsafe(found[0], blocks, calls, ref_of)
        if why:
            notes.append(f"block replay of {found[0] or 'the model'!r} not used: {why}; whole-model passes instead")
            found = None
    # a container holding one block object twice is not a stack of blocks to replay
    if found is None or not distinct or not _BlockStack.replay_matches(ref, found[1], batches[0]):
        whole_model(set(targets))
        return {"mode": "model", "stages": done, "residual_feedback": sorted(partners), "calls": counts, "notes": notes}
    prefix, ref_blocks = found
    # cmp is a copy of ref: the same container there
    cmp_blocks = cast("nn.ModuleList | nn.Sequential", cmp.get_submodule(prefix) if prefix else cmp)
    pre = f"{prefix}." if prefix else ""
    in_blocks = [n for n in reached if n.startswith(pre)]
    # layers outside the blocks that run before them are fitted first, the others last, so
    # the result is the same as with whole-model passes
    first = reached.index(in_blocks[0])
    whole_model({n for n in reached[:first] if not n.startswith(pre)})
    # the original model's block inputs are the same in every call on these batches: a
    # shared cache keeps them (one hidden-state tensor per batch and block)
    store = {} if cache is None else cache

    def ref_inputs(i, compute):
        key = ("ref-block-inputs", prefix, i)
        if key not in store:
            store[key] = compute()
        return store[key]

    def step(block, inputs, b):
        """The next block's inputs of batch b."""
        with naming_batch(position(b)):
            return _next_inputs(_call(block, inputs), inputs)

    ref_in = ref_inputs(0, lambda: _BlockStack.capture_first_inputs(ref, ref_blocks[0], batches, position))
    cmp_in = _BlockStack.capture_first_inputs(cmp, cmp_blocks[0], batches, position)
    for i in range(len(ref_blocks)):
        block_pre = f"{pre}{i}."
        inside = {n[len(block_pre) :]: n for n in targets if n.startswith(block_pre)}
        if inside:
            local = {k: ref_blocks[i].get_submodule(k) for k in inside}
            # the passes run within this iteration, before ref_in / cmp_in move on to the next block
            for stage in execution_order(partial(_call, ref_blocks[i], ref_in[0]), local):
                fit_stage(
                    [inside[k] for k in stage],
                    lambda b, i=i, ref_in=ref_in: _call(ref_blocks[i], ref_in[b]),
                    lambda b, i=i, cmp_in=cmp_in: _call(cmp_blocks[i], cmp_in[b]),
                )
        with torch.no_grad():
            ref_in = ref_inputs(i + 1, lambda i=i, prev=ref_in: [step(ref_blocks[i], x, b) for b, x in enumerate(prev)])
            cmp_in = [step(cmp_blocks[i], x, b) for b, x in enumerate(cmp_in)]
    whole_model({n for n in targets if not any(n in st for st in done)})
    return {"mode": "blocks", "stages": done, "residual_feedback": sorted(partners), "calls": counts, "notes": notes}


def _same_index(b: int) -> int:
    return b


def _home_block(name: str, prefix: str, n_blocks: int) -> int | None:
    """The index of the block whose inside holds layer ``name`` (``prefix.i.``...), or None."""
    pre = f"{prefix}." if prefix else ""
    head, dot, _ = name[len(pre) :].partition(".") if name.startswith(pre) else ("", "", "")
    return int(head) if dot and head.isdigit() and int(head) < n_blocks else None


def _replay_unsafe(prefix: str, blocks: Sequence[nn.Module], calls, ref_of: dict) -> str:
    """Why replaying single blocks would miss calls of a target layer ("" when it would not):
    the replay of block i sees only the calls made while block i runs. (A container holding
    one block object twice is never replayed: that is worth a note only when a target sits
    in such a block.)"""
    seen = Counter(id(b) for b in blocks)
    twice = {i for i, c in seen.items() if c > 1}
    for name, mod in ref_of.items():
        home = _home_block(name, prefix, len(blocks))
        if id(mod) in twice or (home is not None and id(blocks[home]) in twice):
            return f"layer {name!r} is in a block registered at several positions"
    if twice:
        return ""
    for name, _x, scope in calls:
        home = _home_block(name, prefix, len(blocks))
        if home is not None and scope != home:
            where = "outside the blocks" if scope is None else f"in block {scope}"
            return f"layer {name!r} (a module of block {home}) is also called {where}"
    return ""
