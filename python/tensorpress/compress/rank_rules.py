"""compress()'s rank rules as run on a model: the error curves (one SVD per low-rank layer, or
fits at candidate ranks for the tensor structures), each layer's measured sensitivity, and the
allocation under the budget (the arithmetic itself: allocate.py, structured_rules.py). Results
are cached by key so that a sweep over budgets shares them."""

from __future__ import annotations

from tensorpress.compress import distributed as tpdist
from tensorpress.compress.allocate import allocate_by_rule, layer_sensitivity, relative_error_curves
from tensorpress.compress.crossval import cv_error_curves
from tensorpress.compress.lowrank import fit_activation, truncate_fit
from tensorpress.compress.output_error import output_error_parts
from tensorpress.compress.progress import progress_bar
from tensorpress.compress.structured_rules import (
    CURVE_EFFORT,
    CURVE_MIN_GAIN,
    allocate_structured,
    candidate_ranks,
    measure_curves,
)
from tensorpress.compress.structures import ADAPTERS

# calibration batches used to measure each layer's sensitivity (rank_rule="optimism")
SENSITIVITY_BATCHES = 2
# the sensitivities are a linearization at the uniform ranks; more rounds re-measure them at the
# ranks the previous allocation chose (on MiniLM at 50%: 1 round 0.885 mean cosine, 2 rounds 0.874)
SENSITIVITY_ROUNDS = 1


def full_fit_key(method: str, name: str, ridge_kw: dict) -> tuple:
    return ("full-fit", method, name, tuple(sorted(ridge_kw.items())))


def _whitened_full_fits(layers, shot, ridge_kw, cache) -> dict:
    """Every layer's full-rank whitened fit on the one-shot statistics, kept in the cache
    under the key compress()'s "whitened" method reads too: the rank rule's error curves,
    its sensitivities and a whitened run share one decomposition per layer."""
    fits = {}
    for name, layer in layers.items():
        top = min(layer.in_features, layer.out_features)
        fits[name] = cached(
            cache,
            full_fit_key("whitened", name, ridge_kw),
            # called right away by cached(): the loop variables are bound for clarity only
            lambda layer=layer, name=name, top=top: fit_activation(
                layer.weight, layer.bias, shot[name], top, **ridge_kw
            ),
        )
    return fits


def _sensitivities(work_model, batches, layers, shot, ranks, curves, full, cache):
    """Each layer's sensitivity with that layer alone at ranks[name] (cached per ranks);
    ``full``: the layers' full-rank whitened fits, truncated to those ranks."""
    key = ("sensitivity", tuple(layers), tuple(sorted(ranks.items())))
    if cache is not None and key in cache:
        return cache[key]
    fits, errs = {}, {}
    for name, layer in layers.items():
        fit = truncate_fit(full[name], ranks[name], layer.weight, layer.bias, shot[name])
        fits[name] = ADAPTERS["lowrank"].module(layer, fit)
        errs[name] = curves[name][ranks[name]].item()
    weights = _measure_sensitivities(work_model, batches, layers, fits, errs)
    if cache is not None:
        cache[key] = weights
    return weights


def _measure_sensitivities(work_model, batches, layers, fits, errs):
    """layer_sensitivity of ``work_model`` on SENSITIVITY_BATCHES of ``batches``."""
    # the copy's own layers are the originals until they are replaced
    work_layers = {n: work_model.get_submodule(n) for n in layers}
    # evenly spaced batches of the whole calibration set (callers often sort batches by
    # length); under torch.distributed each process measures the ones it owns
    step = max(1, len(batches) // SENSITIVITY_BATCHES)
    picks = list(range(0, len(batches), step))[:SENSITIVITY_BATCHES]
    mine = [batches[i] for k, i in enumerate(picks) if k % tpdist.world() == tpdist.rank()]
    return layer_sensitivity(work_model, mine, work_layers, fits, errs)


def allocate_structured_by_rule(
    rule,
    adapter,
    work_model,
    batches,
    layers,
    shot,
    budget,
    uniform,
    ridge_kw,
    cache=None,
    folds=None,
    progress=False,
    notes=None,
):
    """Ranks of a tensor structure by a rule (see tensorpress.compress.structured_rules): the
    layers' curves from fits at candidate ranks, weighted for "optimism" and "cv" by each
    layer's measured sensitivity at its uniform rank."""

    def measure():
        fits = sum(len(candidate_ranks(adapter, layer, budget)) for layer in layers.values()) * (1 + len(folds or ()))
        bar = progress_bar(fits, f"rank rule: {adapter.name} fits", progress)
        try:
            return measure_curves(
                adapter,
                layers,
                shot,
                budget,
                folds,
                ridge_kw,
                tick=None if bar is None else lambda: bar.update(1),
                keep_fits=uniform,
            )
        finally:
            if bar is not None:
                bar.close()

    key = ("structured-curves", adapter.name, tuple(layers), budget, len(folds or ()), tuple(sorted(ridge_kw.items())))
    curves = cached(cache, key, measure)
    if notes is not None:
        _note_capped_ladders(adapter, layers, curves, budget, notes)
    weights = None
    if rule != "energy":

        def sensitivities():
            fits, errs = {}, {}
            for name, layer in layers.items():
                # the curve's fit at the uniform rank; it is no candidate when the budget keeps
                # about the whole layer, and is fitted here then
                cand = next((c for c in curves[name] if c.rank == uniform[name]), None)
                if cand is not None:
                    fit, errs[name] = cand.fit, cand.train
                else:
                    fit = adapter.fit("whitened", layer, shot[name], uniform[name], {**CURVE_EFFORT, **ridge_kw})
                    err, energy = output_error_parts(layer, fit, shot[name])
                    errs[name] = err / max(energy, 1e-300)
                fits[name] = adapter.module(layer, fit)
            return _measure_sensitivities(work_model, batches, layers, fits, errs)

        weights = cached(
            cache,
            ("structured-sensitivity", adapter.name, tuple(layers), tuple(sorted(uniform.items()))),
            sensitivities,
        )
    rows = next(iter(shot.values())).n
    return allocate_structured(rule, layers, curves, rows, budget, weights, notes)


def _note_capped_ladders(adapter, layers, curves, budget, notes: list) -> None:
    """Say which layers' candidate ladders ended where a higher rank stopped paying."""
    for name, layer in layers.items():
        if len(curves[name]) < len(candidate_ranks(adapter, layer, budget)):
            top = curves[name][-1]
            notes.append(
                f"{adapter.name} layer {name!r}: ranks above {top.rank} were not tried: rank {top.rank} "
                f"lowered the layer's training error by less than {CURVE_MIN_GAIN:.0%} (relative error "
                f"{top.train:.3g})"
            )


def cached(cache, key, compute):
    value = None if cache is None else cache.get(key)
    if value is None:
        value = compute()
        if cache is not None:
            cache[key] = value
    return value


def allocate_lowrank_by_rule(
    rule, work_model, batches, layers, shot, budget, uniform, ridge_kw, cache=None, folds=None, notes=None
):
    """Ranks by a rule; for "optimism" and "cv" each layer's errors are weighted by the
    measured sensitivity of the model's output to it (see SENSITIVITY_ROUNDS); "cv" needs
    ``folds``, the per-fold one-shot statistics."""
    # one decomposition per layer for the curves and the sensitivities (cached for later calls)
    full = _whitened_full_fits(layers, shot, ridge_kw, cache)
    curves = cached(cache, ("curves", tuple(layers)), lambda: relative_error_curves(layers, shot, full))
    if rule == "energy":
        return allocate_by_rule(rule, layers, shot, budget, curves=curves, **ridge_kw)
    heldout = None
    if rule == "cv":
        heldout = cached(
            cache, ("cv-curves", tuple(layers), len(folds)), lambda: cv_error_curves(layers, folds, **ridge_kw)
        )
    at = dict(uniform)
    for round_ in range(SENSITIVITY_ROUNDS):
        weights = _sensitivities(work_model, batches, layers, shot, at, curves, full, cache)
        last = round_ == SENSITIVITY_ROUNDS - 1  # only the final allocation's slack is reported
        chosen = allocate_by_rule(
            rule,
            layers,
            shot,
            budget,
            curves=curves,
            weights=weights,
            heldout=heldout,
            notes=notes if last else None,
            **ridge_kw,
        )
        # a layer kept dense is linearized at its uniform rank
        at = {n: (uniform[n] if r is None else r) for n, r in chosen.items()}
    return chosen
