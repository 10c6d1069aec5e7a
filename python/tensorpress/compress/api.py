"""tensorpress.compress(model, calib, ...): data-driven post-training compression of a model."""

from __future__ import annotations

import copy
import fnmatch
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from tensorpress._validate import is_int
from tensorpress.compress import distributed as tpdist
from tensorpress.compress.account import build_account, screen
from tensorpress.compress.allocate import (
    RANK_RULES,
)
from tensorpress.compress.batchnorm import fold_batchnorms
from tensorpress.compress.calibrate import (
    call_model,
    hooks,
    layer_features,
    layer_row_chunks,
    naming_batch,
    record_inputs,
    row_mask,
    row_signature,
    run_until_stop,
)
from tensorpress.compress.crossval import DEFAULT_FOLDS, merge_stats
from tensorpress.compress.fitting import ONE_SHOT_METHODS, LayerFitter
from tensorpress.compress.memory import (
    DEFAULT_MEMORY_FRACTION,
    available_memory,
    format_bytes,
    parse_memory,
    plan_memory,
)
from tensorpress.compress.progress import progress_bar, show_progress
from tensorpress.compress.rank_rules import allocate_lowrank_by_rule, allocate_structured_by_rule
from tensorpress.compress.report import CompressionReport, count_params, state_dict_bytes
from tensorpress.compress.shared import call_errors, module_names, tied_layers
from tensorpress.compress.stats import GramStats
from tensorpress.compress.structures import ADAPTERS, STRUCTURES, weight_matrix

SEQUENTIAL_METHODS = ("activation", "convex", "convex_weights", "relu", "gelu")
SAMPLE_METHODS = ("convex", "relu", "gelu")  # need rows of (X, X~), not only their Grams
DEFAULT_KEEP_ROWS = 4096
METHODS = ONE_SHOT_METHODS + SEQUENTIAL_METHODS


def eligible_layers(model: nn.Module, structure: str = "lowrank") -> dict[str, nn.Module]:
    """The layers a structure can replace (see tensorpress.compress.structures)."""
    adapter = ADAPTERS[structure]
    return {name: mod for name, mod in model.named_modules() if adapter.eligible(mod)}


def _match(name: str, patterns: Sequence[str]) -> bool:
    return any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns)


def _as_patterns(value, arg: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, (list, tuple, set)) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"{arg}: expected a layer name, a glob pattern or a list of them, got {value!r}")
    return list(value)


def select_targets(model: nn.Module, structure: str, include=None, exclude=None) -> list[str]:
    """Eligible layer names after include/exclude (names or glob patterns); unknown names fail.
    A module registered under several names is one target, under its first name; a pattern
    matching any of its names includes (or excludes) it."""
    return screen_targets(model, structure, include, exclude)[0]


def screen_targets(
    model: nn.Module, structure: str, include=None, exclude=None
) -> tuple[list[str], dict[str, tuple[str, str]]]:
    """(select_targets' names, {every other nn.Linear / conv layer: (status, why)}): status
    "skipped" for a layer the structure cannot replace, "excluded" for one the include/exclude
    patterns leave out (see compress.account)."""
    adapter = ADAPTERS[structure]
    inc, exc = _as_patterns(include, "include"), _as_patterns(exclude, "exclude")
    names_of = module_names(model)
    all_names = {n for names in names_of.values() for n in names}
    for arg, pats in (("include", inc), ("exclude", exc)):
        unknown = [p for p in pats if not any(fnmatch.fnmatchcase(n, p) or n == p for n in all_names)]
        if unknown:
            raise ValueError(
                f"{arg}: no layer of the model matches {unknown}; eligible layers are e.g. "
                f"{list(eligible_layers(model, structure))[:5]}"
            )
    names, left_out = screen(model, adapter.why_not, names_of, inc, exc)
    if not names:
        why = "; ".join(f"{n}: {w}" for n, (_, w) in list(left_out.items())[:3])
        raise ValueError(
            f"model: no eligible layer to compress for structure={structure!r} "
            f"(eligible: {adapter.describe()}; after include={inc}, exclude={exc})"
            + (f"; left out: {why}" if why else "")
        )
    if "" in names:  # the returned copy would have to be another object than a copy of the model
        raise ValueError(
            f"model: is itself a layer to compress ({type(model).__name__}); compress() replaces "
            f"layers inside a model: pass e.g. nn.Sequential(model), or use the layer classes' "
            f"from_dense"
        )
    return names, left_out


def _skip_tied(model: nn.Module, targets: list[str], ranks) -> tuple[list[str], dict[str, str]]:
    """(targets left, {skipped layer: why}): a layer whose weights are tied to another module
    stays dense (replacing it would untie them and add parameters)."""
    skipped = tied_layers(model, {n: model.get_submodule(n) for n in targets})
    if not skipped:
        return targets, {}
    named = [n for n in skipped if ranks is not None and n in ranks]
    if named:
        raise ValueError(f"ranks: layer {named[0]!r} cannot be compressed: {skipped[named[0]]}; drop it from ranks")
    left = [n for n in targets if n not in skipped]
    if not left:
        raise ValueError(f"model: every layer to compress has tied weights ({skipped}); nothing to compress")
    warnings.warn(
        f"compress: layers with tied weights kept dense: {sorted(skipped)} (see report.skipped)", stacklevel=3
    )
    return left, skipped


def _check_args(
    model, calib, structure, method, budget, ranks, rank_rule, cv_folds=DEFAULT_FOLDS, fold_batchnorm=False
):
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(fold_batchnorm, bool):
        raise TypeError(f"fold_batchnorm: expected True or False, got {fold_batchnorm!r}")
    if structure not in STRUCTURES:
        raise ValueError(f"structure: expected one of {STRUCTURES}, got {structure!r}")
    if isinstance(method, Mapping):
        bad = {k: v for k, v in method.items() if not isinstance(k, str) or v not in SEQUENTIAL_METHODS}
        if bad or not method:
            raise ValueError(
                f"method: a dict maps layer names or glob patterns to one of {SEQUENTIAL_METHODS}, "
                f"got {bad or method!r}"
            )
    elif method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS} or a dict {{pattern: method}}, got {method!r}")
    allowed = ADAPTERS[structure].methods
    used = set(method.values()) if isinstance(method, Mapping) else {method}
    if not used <= set(allowed):
        raise ValueError(f"method: structure={structure!r} supports {allowed}, got {sorted(used - set(allowed))}")
    if ranks is None:
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
            raise ValueError(f"budget: expected a fraction of parameters kept in (0, 1], got {budget!r}")
    elif not isinstance(ranks, Mapping):
        raise TypeError(f"ranks: expected a dict {{layer name: rank}}, got {type(ranks).__name__}")
    if rank_rule is not None and rank_rule not in RANK_RULES:
        raise ValueError(f"rank_rule: expected None or one of {RANK_RULES}, got {rank_rule!r}")
    if rank_rule == "cv" and (not is_int(cv_folds) or cv_folds < 2):
        raise ValueError(f"cv_folds: expected an int >= 2 (folds of the calibration batches), got {cv_folds!r}")
    if not (isinstance(method, str) and method == "svd") or rank_rule is not None:
        if calib is None:
            raise ValueError(f"calib: method={method!r} (and any rank_rule) needs calibration batches, got None")


def _batches(calib) -> list:
    if calib is None:
        return []
    if isinstance(calib, Tensor):
        raise TypeError(
            "calib: expected an iterable of batches (e.g. a list of tensors or of dicts), got one "
            "tensor; wrap it as [tensor] or split it with tensor.split(batch_size)"
        )
    batches = list(calib)
    if not batches:
        raise ValueError("calib: expected at least one calibration batch, got none")
    return batches


def _first_batch_calls(model: nn.Module, batch, layers: Mapping[str, nn.Module], position: int = 0) -> dict:
    """Check that the model runs on its first calibration batch (the model's own message says
    which shape or dtype it wanted) and count each layer's calls in that pass: {name: calls}."""
    tensors = (
        list(batch.values())
        if isinstance(batch, Mapping)
        else (list(batch) if isinstance(batch, (tuple, list)) else [batch])
    )
    for t in tensors:
        if isinstance(t, Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"calib[{position}]: the batch contains NaN or Inf")
    calls = {n: 0 for n in layers}

    def count(name, _x):
        calls[name] += 1

    with hooks(record_inputs(layers, count)), naming_batch(position), torch.no_grad():
        call_model(model, batch)
    return calls


def _check_ranks(
    ranks: Mapping,
    layers: Mapping[str, nn.Module],
    structure: str = "lowrank",
    left_out: Mapping[str, tuple[str, str]] | None = None,
) -> dict:
    left_out = left_out or {}
    unknown = [n for n in ranks if n not in layers]
    known = [n for n in unknown if n in left_out]
    if known:  # a layer of the model that was left out: say why
        status, why = left_out[known[0]]
        raise ValueError(f"ranks: layer {known[0]!r} is {status}: {why}; drop it from ranks")
    if unknown:
        raise ValueError(
            f"ranks: unknown or excluded layers {unknown}; compressible layers are e.g. {list(layers)[:5]}"
        )
    out: dict[str, Any] = {}
    for name, layer in layers.items():
        if name not in ranks:
            raise ValueError(
                f"ranks: no rank given for layer {name!r} (give every targeted layer one, or "
                f"narrow the targets with include=)"
            )
        r = ranks[name]
        if r is None and structure == "lowrank":  # kept dense (refitted by "activation")
            out[name] = None
            continue
        out[name] = ADAPTERS[structure].check_rank(name, layer, r)
    return out


def _append_input(got: dict[str, list[Tensor]], name: str, x: Tensor) -> None:
    got.setdefault(name, []).append(x)


def one_shot_stats(
    model: nn.Module,
    batches: Sequence,
    layers: Mapping[str, nn.Module],
    progress=None,
    positions: Sequence[int] | None = None,
    plans: Mapping | None = None,
) -> dict[str, GramStats]:
    """Input statistics of every layer of the unmodified model, from one pass per batch; a
    layer called several times per pass gets the rows of all its calls. ``positions``: each
    batch's index in the user's calib list (for error messages). ``plans``: {layer:
    memory.LayerMemory}: the representation of its statistics and the rows per update (a
    batch's rows are formed and added a chunk at a time)."""
    plans = plans or {}
    stats: dict[str, GramStats] = {}
    for i, batch in enumerate(batches):
        pos = i if positions is None else positions[i]
        mask = row_mask(batch)
        got: dict[str, list[Tensor]] = {}  # every call's input, in call order
        with hooks(record_inputs(layers, partial(_append_input, got))), naming_batch(pos):
            run_until_stop(partial(call_model, model, batch))
        missing = [n for n in layers if n not in got]
        if missing:
            raise ValueError(f"include: layers {missing} are never called by the model on calibration batch {pos}")
        if not stats:
            # layers called once, reading the very same tensor into the same rows (q, k, v),
            # share one accumulator (unless their statistics are kept through their weights)
            owner: dict[tuple, GramStats] = {}
            for name, layer in layers.items():
                plan = plans.get(name)
                kron = plan is not None and plan.kronecker is not None
                kronecker = plan.kronecker if plan is not None else None
                key = (id(got[name][0]), row_signature(layer)) if len(got[name]) == 1 and not kron else (name,)
                stats[name] = owner.setdefault(
                    key,
                    GramStats(
                        layer_features(layer),
                        paired=False,
                        project=weight_matrix(layer) if kron else None,
                        dtype=torch.float64 if plan is None else plan.dtype,
                        kronecker=kronecker,
                        conv=layer if isinstance(layer, nn.Conv2d) else None,
                        buffer_bytes=64 << 20 if plan is None else max(plan.rows_bytes, 1 << 20),
                    ),
                )
        done: set[int] = set()
        for name in layers:
            if id(stats[name]) in done:
                continue
            done.add(id(stats[name]))
            chunk = plans[name].chunk_rows if name in plans else None
            for x in got[name]:
                if isinstance(layers[name], nn.Conv2d):
                    if not torch.isfinite(x).all():
                        raise ValueError(f"layer {name!r}: calibration activations contain NaN or Inf (batch {pos})")
                    stats[name].update_conv(x, None, chunk)
                    continue
                for rows_ in layer_row_chunks(layers[name], x, mask, chunk):
                    if not torch.isfinite(rows_).all():
                        raise ValueError(f"layer {name!r}: calibration activations contain NaN or Inf (batch {pos})")
                    stats[name].update(rows_)
        if progress is not None:
            progress.update(1)
    for unique in {id(st): st for st in stats.values()}.values():
        unique.all_reduce_()  # sums over processes under torch.distributed; a no-op otherwise
    return stats


def _methods_by_layer(method, targets: Sequence[str]) -> dict[str, str]:
    """{layer: method}; a dict method maps patterns to methods, the first match wins."""
    if isinstance(method, str):
        return {n: method for n in targets}
    out = {}
    for name in targets:
        hit = next((m for pat, m in method.items() if _match(name, [pat])), None)
        if hit is None:
            raise ValueError(f"method: no pattern of {list(method)} matches layer {name!r} (add '*': 'activation')")
        out[name] = hit
    return out


def _reference_stats(ref, batches, all_batches, layers, folds, cache, progress, plans=None):
    """(one-shot statistics of every layer on all batches, per-fold statistics or None).
    ``batches`` are this process's share of ``all_batches``. With folds, fold k holds the
    batches i = k mod folds of all processes together (so the folds do not depend on the
    number of processes), each process passes its share of every fold once, and the totals
    are merged from the folds."""
    reps = tuple(sorted((n, p.representation) for n, p in (plans or {}).items() if p.representation != "exact"))
    key, fold_key = ("one-shot", tuple(layers)) + reps, ("folds", tuple(layers), folds) + reps
    shot = None if cache is None else cache.get(key)
    parts = None if (cache is None or not folds) else cache.get(fold_key)
    if shot is not None and (not folds or parts is not None):
        return shot, parts
    bar = progress_bar(len(batches), "calibration statistics", progress)
    index = list(range(len(all_batches)))  # sliced as the batches are, for error messages
    if folds:
        parts = [
            one_shot_stats(ref, tpdist.shard(all_batches[k::folds]), layers, bar, tpdist.shard(index[k::folds]), plans)
            for k in range(folds)
        ]
        shot = merge_stats(parts)
    else:
        shot = one_shot_stats(ref, batches, layers, bar, tpdist.shard(index), plans)
    if bar is not None:
        bar.close()
    if cache is not None:
        cache[key] = shot
        if folds:
            cache[fold_key] = parts
    return shot, parts


def _training_flags(model: nn.Module) -> dict[int, tuple[nn.Module, bool]]:
    """{id(module): (module, its own training flag)} (a model may mix train and eval
    submodules; keyed by identity, whatever the modules' own __eq__)."""
    return {id(m): (m, m.training) for m in model.modules()}


def _restore_training_flags(flags: Mapping[int, tuple[nn.Module, bool]]) -> None:
    # set the flags themselves: model.train(flag) would overwrite the submodules' own
    for m, flag in flags.values():
        m.training = flag


def _copy_training_flags(model: nn.Module, flags: Mapping[int, tuple[nn.Module, bool]], out: nn.Module) -> None:
    """Give each module of ``out`` (a compressed copy of ``model``) the flag of the module at
    its name in ``model``; a replacement's own submodules take the replacement's flag."""
    by_name = {name: flags[id(m)][1] for name, m in model.named_modules(remove_duplicate=False)}
    given: dict[str, bool] = {}
    for name, m in out.named_modules(remove_duplicate=False):  # parents come before children
        flag = by_name.get(name, given.get(name.rpartition(".")[0], flags[id(model)][1]))
        m.training = given[name] = flag


def _report_repeated_calls(
    report: CompressionReport, ref: nn.Module, cmp: nn.Module, batches, calls: Mapping, one_shot: bool, positions
) -> None:
    """For each layer called several times per pass: its output error at every call, measured
    on the models (see shared.call_errors); its rel_error is the worst of them."""
    repeated = [r for r in report.layers if calls.get(r.name, 1) > 1]
    if not repeated or not batches:
        return
    errors = call_errors(ref, cmp, batches, [r.name for r in repeated], one_shot, positions)
    for r in repeated:
        r.call_errors = errors[r.name]
        r.rel_error = max(r.call_errors)


def compress(
    model: nn.Module,
    calib: Iterable | None = None,
    structure: str = "lowrank",
    method: str | Mapping[str, str] = "activation",
    budget: float = 0.5,
    ranks: Mapping[str, int] | None = None,
    rank_rule: str | None = None,
    include=None,
    exclude=None,
    keep_rows: int = 0,
    ridge: float | None = None,
    progress: bool | None = None,
    cache: dict | None = None,
    residual_feedback: bool = True,
    cv_folds: int = DEFAULT_FOLDS,
    fold_batchnorm: bool = False,
    max_memory: int | float | str | None = None,
    report_error: bool | None = None,
) -> tuple[nn.Module, CompressionReport]:
    """Compress the layers of ``model`` and return (compressed copy, report).

    Modules used at more than one place: a layer called several times per forward pass (or
    registered under several names) is fitted on the statistics of all its calls, replaced
    under every name it has by one module, and reported once, with the error of its worst
    call; a layer whose weights are tied to another module's is kept dense (listed in
    report.skipped, with a warning), so the tie holds.

    Every nn.Linear / conv layer of the model is accounted for in report.account (printed with
    the report): compressed (structure, rank), kept dense (ranks or the rank rule), skipped with
    the reason (a type or shape the structure cannot replace, tied weights) or excluded by
    include/exclude.

    Args:
        model: any nn.Module; it is deep-copied and never modified: its parameters, buffers
            and every module's own training flag are as they were afterwards, also when
            compress() fails. The returned model has the same training flags at every name.
        calib: an iterable of calibration batches, each what the model takes (a tensor, a tuple
            of positional arguments, or a dict of keyword arguments; a dict's
            ``attention_mask`` drops padding tokens from the statistics). Needed by every
            method but "svd".
        structure: "lowrank" (LowRankLinear in place of nn.Linear), "tt" (TTLinear in place
            of nn.Linear, the cores fitted by ALS sweeps on the data-aware objective), "tucker"
            / "cp" (TuckerConv2d / CPConv2d in place of nn.Conv2d, the factors fitted by ALS
            on the conv's input patches). The tensor structures take the methods "svd"
            (weights only), "whitened" and "activation", and every rank_rule (their error
            curves come from fits at candidate ranks: see compress.structured_rules).
        method: "activation" (sequential: each layer fitted on the inputs of the model
            compressed so far, closed form of Zhang & Saab), "whitened" (the same on the
            original model's inputs, all layers from one pass), "svd" (weights only);
            sequential too, from ``keep_rows`` sampled rows: "convex" (Zhang & Saab's convex
            program, Theorem 4.4: least squares of the pre-activations under their entrywise
            and nuclear-norm bounds, then rank r), "relu" (their Theorem 4.9: maximum
            likelihood for a layer followed by ReLU, on the post-ReLU outputs), "gelu" (the
            post-GELU error of a layer followed by GELU); and from the Grams,
            "convex_weights" (a nuclear-norm ball on the weights themselves, then
            truncation: not the paper's program). A dict
            {layer name or glob pattern: method} mixes sequential methods, first match wins,
            e.g. {"*.intermediate.dense": "gelu", "*": "activation"}.
        budget: fraction of the targeted layers' weight parameters kept, in (0, 1].
        ranks: {layer name: rank} instead of a budget (every targeted layer needs one): an
            int, or for "tt" one bond rank per bond, for "tucker" (r_out, r_in); for "lowrank"
            None keeps a layer dense (with "activation" it is still refitted by least squares
            on the compressed model's inputs, when there are enough calibration rows).
        rank_rule: how the budget is split across layers: None (the same fraction of every
            layer), "optimism" (minimize the summed estimated test error, training error plus
            asymptotic optimism, of the layers' relative outputs), "cv" (the same with each
            layer's test error measured by ``cv_folds``-fold cross-validation over the
            calibration batches: ``cv_folds`` fits per layer instead of one) or "energy" (the
            same fraction of whitened output energy kept in every layer).
        cv_folds: folds for rank_rule="cv" (batch i goes to fold i mod cv_folds; at least
            that many calibration batches per process).
        include, exclude: layer names or glob patterns ("encoder.*.attention.*").
        keep_rows: rows of (X, X~) kept per layer for "convex"/"relu"/"gelu" (default 4096 when used).
        ridge: Gram regularization relative to its mean diagonal (default 1e-6).
        progress: show progress bars (tqdm) on stderr; None (the default): when stderr is a
            terminal.
        residual_feedback: for "activation" low-rank layers that end a post-norm residual
            branch (parent(h, residual) -> norm(layer(...) + residual), as BERT's output
            blocks; detected and checked numerically on the first batch), fit the layer to also
            make up for the error the compressed model has accumulated in the residual stream:
            target X W^T + b + (residual - residual~) instead of X W^T + b. On MiniLM-L6 at
            50% kept (activation + optimism, 1,000 sentences) it lifts the mean cosine of the
            embeddings from 0.884 to 0.912. No effect on models without such branches.
        cache: a dict to share between calls on the same model and calibration batches (for
            example a sweep over budgets): the original model's input statistics, block inputs,
            calibration rows (up to sequential.REF_ROWS_BYTES, 3 GiB), the whitened
            decompositions and the layers' sensitivities are computed once and reused.
        fold_batchnorm: fold each eval-mode BatchNorm2d that directly follows a conv to be
            compressed into that conv before the fit (its running statistics scale the conv's
            weight and shift its bias), so the fit sees the conv as the model uses it; the
            returned model has a FoldedBatchNorm (an identity) in the BatchNorm's place and
            computes the same function. Pairs are found on the first calibration batch (the
            BatchNorm reads the tensor the conv returned; without calibration batches: side by
            side in an nn.Sequential) and the folded model's output is checked on it; the
            report lists the BatchNorms folded (report.folded_batchnorm) and, in its notes,
            those after a conv left as they were, with the reason. A BatchNorm to fold that is
            in training mode is refused (ValueError). See compress.batchnorm.
        max_memory: the memory budget of the calibration statistics and fits, in bytes or as
            a size such as "8G"; None (the default): half the memory available when compress()
            starts (MemAvailable). Before any calibration pass, each layer's needs are
            estimated and its statistics given the most exact representation that fits: the
            exact float64 Gram of its inputs, the same in float32, or (Tucker/CP convs fitted
            by "activation"/"whitened") a Kronecker-factored patch covariance (channels x
            spatial offsets); the report says which (report.memory, the "stats" column and a
            note per approximated layer). When even the smallest does not fit, a
            memory.MemoryPlanError (a ValueError) names the layer, the estimate and the options.
        report_error: measure each layer's output error on the calibration data for the
            report's "rel err" column. None (the default): on, except for method="svd",
            whose fit needs no statistics: there they are only gathered when asked for (or a
            rank rule needs them), and the column shows nan.
    Returns:
        (compressed model, CompressionReport).
    Raises:
        CalibrationBatchError (a ValueError): the model failed on a calibration batch; the
            message names it as calib[i] and the model's own error is chained.
    """
    _check_args(model, calib, structure, method, budget, ranks, rank_rule, cv_folds, fold_batchnorm)
    if report_error is not None and not isinstance(report_error, bool):
        raise TypeError(f"report_error: expected None, True or False, got {report_error!r}")
    memory_budget, budget_source = _memory_budget(max_memory)
    all_batches, batches, positions, folds = _split_batches(calib, rank_rule, cv_folds)
    progress = show_progress(progress)
    screened, left_out = screen_targets(model, structure, include, exclude)
    targets, skipped = _skip_tied(model, screened, ranks)
    original, folding = model, None
    if fold_batchnorm:
        # from here on the folded copy stands for the model (it computes the same outputs)
        model, folding, cache = _fold_first(model, targets, left_out, skipped, all_batches, cache)
    per_layer = _methods_by_layer(method, targets)
    if any(m in SAMPLE_METHODS for m in per_layer.values()) and not keep_rows:
        keep_rows = DEFAULT_KEEP_ROWS
    layers = {n: model.get_submodule(n) for n in targets}
    chosen = _check_ranks(ranks, layers, structure, left_out) if ranks is not None else None
    one_shot = isinstance(method, str) and method in ONE_SHOT_METHODS
    svd_only = method == "svd"
    if report_error is None:
        report_error = not svd_only
    # one-shot statistics: needed by one-shot methods (svd: only for the report's error column)
    # and rank rules; with a cache they also save the sequential runs a third of their Gram work
    need_shot = bool(all_batches) and (
        rank_rule is not None or (one_shot and (not svd_only or report_error)) or (not one_shot and cache is not None)
    )
    plan = plan_memory(
        layers,
        {n: (None if svd_only and not need_shot else per_layer[n]) for n in targets},
        structure,
        memory_budget,
        budget_source,
        sequential=not one_shot and bool(all_batches),
        one_shot=need_shot,
        keep_rows=keep_rows,
        folds=folds,
    )
    ridge_kw = {} if ridge is None else {"ridge": ridge}
    start = time.perf_counter()
    names_of = module_names(model)
    flags = _training_flags(model)
    cmp = copy.deepcopy(model).eval()
    report = _new_report(original, structure, method, per_layer, budget, ranks, rank_rule, skipped, plan, folding)
    try:
        # statistics of the model as it infers (dropout off, normalization buffers left alone)
        model.eval()
        calls = _first_batch_calls(model, batches[0], layers, positions[0]) if batches else {}
        shot, fold_stats = None, None
        if batches and need_shot:
            shot, fold_stats = _reference_stats(
                model, batches, all_batches, layers, folds, cache, progress, plan.layers
            )
        if chosen is None:
            chosen = {n: ADAPTERS[structure].uniform_rank(layer, budget) for n, layer in layers.items()}
            if rank_rule is not None:
                t0 = time.perf_counter()
                chosen = _ranks_by_rule(
                    rank_rule,
                    structure,
                    cmp,
                    all_batches,
                    layers,
                    shot,
                    budget,
                    chosen,
                    ridge_kw,
                    cache,
                    fold_stats,
                    progress,
                    report.notes,
                )
                report.rank_rule_seconds = time.perf_counter() - t0
        fitter = LayerFitter(
            structure=structure,
            adapter=ADAPTERS[structure],
            layers=layers,
            per_layer=per_layer,
            chosen=chosen,
            ranks=ranks,
            rank_rule=rank_rule,
            ridge_kw=ridge_kw,
            cache=cache,
            report=report,
            cmp=cmp,
            names_of=names_of,
            calls=calls,
            report_error=report_error,
        )
        if one_shot:
            fitter.fit_one_shot(targets, shot, str(method), progress)
        else:
            fitter.fit_sequential(
                model, batches, targets, shot, keep_rows, residual_feedback, positions, plan.layers, progress
            )
        if report_error:
            _report_repeated_calls(report, model, cmp, batches, calls, one_shot=one_shot, positions=positions)
    finally:
        _restore_training_flags(flags)
    _copy_training_flags(model, flags, cmp)
    _finish_report(report, model, cmp, targets, names_of, left_out, skipped, fitter.dense_why, folding, start)
    return cmp, report


def _new_report(original, structure, method, per_layer, budget, ranks, rank_rule, skipped, plan, folding):
    """The report's header: what was asked, the model before, the memory plan, the folding."""
    report = CompressionReport(
        structure=structure,
        method=method if isinstance(method, str) else "+".join(sorted(set(per_layer.values()))),
        budget=None if ranks else float(budget),
        rank_rule=rank_rule,
        model_params_before=count_params(original),
        bytes_before=state_dict_bytes(original),
        skipped=skipped,
    )
    report.memory = plan.to_dict()
    report.memory_lines = plan.lines()
    if folding is not None:
        report.folded_batchnorm = dict(folding.folded)
        report.notes += folding.notes
    return report


def _memory_budget(max_memory) -> tuple[int, str]:
    """(bytes the statistics and fits may use, where that figure comes from)."""
    if max_memory is not None:
        return parse_memory(max_memory), "max_memory"
    avail = available_memory()
    return int(
        DEFAULT_MEMORY_FRACTION * avail
    ), f"{100 * DEFAULT_MEMORY_FRACTION:.0f}% of MemAvailable {format_bytes(avail)}"


def _split_batches(calib, rank_rule: str | None, cv_folds: int) -> tuple[list, list, list[int], int]:
    """(all calibration batches, this process's share under torch.distributed, each share
    batch's index in calib, the cross-validation folds or 0)."""
    all_batches = _batches(calib)
    folds = cv_folds if rank_rule == "cv" else 0
    if folds and len(all_batches) < folds * tpdist.world():
        per = " (one per fold and process)" if tpdist.world() > 1 else ""
        raise ValueError(
            f"calib: rank_rule='cv' with cv_folds={folds} needs at least {folds * tpdist.world()} "
            f"calibration batches{per}, got {len(all_batches)}"
        )
    return all_batches, tpdist.shard(all_batches), tpdist.shard(list(range(len(all_batches)))), folds


def _fold_first(model, targets, left_out, skipped, all_batches, cache):
    """(the model with its BatchNorms folded into the convs before them, the folding, the cache
    to use: a folded conv's fits differ from the dense one's, so they get a cache of their own)."""
    not_fitted = {
        **{n: f"{status}: {why}" for n, (status, why) in left_out.items()},
        **{n: f"skipped: {why}" for n, why in skipped.items()},
    }
    # every process finds the pairs on the same batch (calib[0]), so they fold alike
    folding = fold_batchnorms(model, targets, not_fitted, all_batches[0] if all_batches else None)
    if cache is not None and folding.folded:
        cache = cache.setdefault(("fold_batchnorm",), {})
    return folding.model, folding, cache


def _ranks_by_rule(
    rule, structure, cmp, all_batches, layers, shot, budget, uniform, ridge_kw, cache, fold_stats, progress, notes
) -> dict:
    """The ranks a rank rule gives: low rank's from one SVD per layer, the tensor structures'
    from error curves measured at candidate ranks (see compress.rank_rules)."""
    if structure == "lowrank":
        return allocate_lowrank_by_rule(
            rule, cmp, all_batches, layers, shot, budget, uniform, ridge_kw, cache, fold_stats, notes=notes
        )
    return allocate_structured_by_rule(
        rule,
        ADAPTERS[structure],
        cmp,
        all_batches,
        layers,
        shot,
        budget,
        uniform,
        ridge_kw,
        cache,
        fold_stats,
        progress,
        notes=notes,
    )


def _finish_report(report, model, cmp, targets, names_of, left_out, skipped, dense_why, folding, start) -> None:
    """Totals, the layers in the model's order and the account of every layer."""
    report.model_params_after = count_params(cmp)
    report.bytes_after = state_dict_bytes(cmp)
    report.seconds = time.perf_counter() - start
    order = {n: i for i, n in enumerate(targets)}
    report.layers.sort(key=lambda r: order[r.name])
    # the same in every mode: the rows the first layer's statistics hold (each layer's in its row)
    report.calibration_rows = report.layers[0].rows
    report.account = build_account(model, names_of, left_out, skipped, report.layers, dense_why)
    if folding is not None:
        convs = {conv: bn for bn, conv in folding.folded.items()}
        for a in report.account:
            if a.name in convs:
                a.why += f"; {convs[a.name]!r} (BatchNorm) folded into it before the fit"
