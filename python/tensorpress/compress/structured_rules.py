r"""Rank rules for the tensor structures (rank_rule with structure="tt", "tucker" or "cp").

A low-rank layer's error is known at every rank from one SVD (see allocate.py). TT, Tucker-2
and CP fits are not nested that way, so each layer's error curve is measured at a grid of
candidate ranks: those the uniform rule gives at CANDIDATE_FRACTIONS of the layer's parameters
and at the budget asked for, each fitted on the original model's inputs (the "whitened" fit)
with a lighter ALS than the final fit (CURVE_EFFORT: the curves compare trade-offs between
layers; the layer is refitted in full at the rank chosen). Then, as for low rank:

* "optimism": relative training error -> estimated test error by tensorpress.rank's layer
  optimism (allocate.optimism_estimate), with df the dimension of the structure's manifold (TT:
  the cores less the bond gauges; Tucker-2: less the factors' gauges; CP: less three scalings
  per component) plus the bias, out responses per row and the layer's fan-in as inputs;
* "cv": every candidate fitted on K - 1 folds of the calibration batches and scored on the
  held-out fold (K times the fits);
* "energy": one relative-error threshold for every layer, set so the total fits the budget.

For "optimism" and "cv" each layer's curve is weighted by the measured sensitivity of the
model's output to that layer, and tensorpress.rank.allocate_ranks picks one candidate per layer,
or keeps it dense, under the total budget.

CP ranks are capped where they stop paying: CP fits are not nested (a higher rank's ALS may fit
no better than a lower one's, and CP-ALS at high rank is the costliest fit of all), so a CP
layer's ladder is measured upwards only while each candidate lowers the layer's best training
error by CURVE_MIN_GAIN; the first candidate that does not (or an error already at
CURVE_EXACT) ends it. The ranks above are never fitted, so no rule can spend budget on them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from torch import Tensor, nn

from tensorpress.compress.allocate import KEEP_DENSE, fitting_threshold, note_unused_budget, optimism_estimate
from tensorpress.compress.crossval import merge_stats
from tensorpress.compress.output_error import output_error_parts
from tensorpress.compress.stats import GramStats
from tensorpress.compress.structures import budget_params

# fractions of a layer's parameters at which its error is measured (with the budget asked for)
CANDIDATE_FRACTIONS = (0.03, 0.07, 0.12, 0.2, 0.3, 0.45, 0.6, 0.8)
# the curve fits: one ALS sweep of few CG steps after the weights-only decomposition
CURVE_EFFORT = {"sweeps": 1, "cg_iters": 5}
# a CP candidate must lower the best training error so far by this fraction, or the ladder ends
CURVE_MIN_GAIN = 0.01
# a relative training error this small is an exact fit: nothing above it can pay
CURVE_EXACT = 1e-12


@dataclass
class Candidate:
    """One rank of one layer: its parameters, degrees of freedom, relative squared output
    error on all calibration rows (``train``) and, for "cv", on held-out rows."""

    rank: Any
    params: int
    dof: int
    train: float
    heldout: float | None = None
    fit: Any = field(default=None, repr=False)  # kept only where measure_curves was asked to


def candidate_ranks(adapter, layer: nn.Module, budget: float) -> list:
    """Distinct ranks from the uniform rule at CANDIDATE_FRACTIONS and at ``budget``, and the
    adapter's other splits of the rank at ``budget`` (`rank_variants`: Tucker's (r_out, r_in)
    away from the channel ratio), that keep fewer parameters than the layer, in increasing
    parameter count."""
    ranks = {}
    for fraction in sorted(set(CANDIDATE_FRACTIONS) | {budget}):
        rank = adapter.uniform_rank(layer, fraction)
        if adapter.rank_params(layer, rank) < budget_params(layer):
            ranks[rank] = rank
    if hasattr(adapter, "rank_variants"):
        for rank in adapter.rank_variants(layer, adapter.uniform_rank(layer, budget)):
            if adapter.rank_params(layer, rank) < budget_params(layer):
                ranks[rank] = rank
    return sorted(ranks.values(), key=lambda r: adapter.rank_params(layer, r))


def measure_curves(
    adapter,
    layers: Mapping[str, nn.Module],
    shot: Mapping[str, GramStats],
    budget: float,
    folds: Sequence[Mapping[str, GramStats]] | None = None,
    ridge_kw: dict | None = None,
    tick: Callable[[], None] | None = None,
    keep_fits: Mapping[str, Any] | None = None,
) -> dict[str, list[Candidate]]:
    """{layer: its candidates with training (and with ``folds``, cross-validated) errors}.
    ``tick`` is called after every fit (progress); the candidate at ``keep_fits[layer]`` keeps
    its fit on all the rows (the sensitivities swap it in)."""
    effort = {**CURVE_EFFORT, **(ridge_kw or {})}
    ranks = {name: candidate_ranks(adapter, layer, budget) for name, layer in layers.items()}
    capped = getattr(adapter, "caps_flat_curves", False)

    def scored(layer, rank, train, test):
        fit = adapter.fit("whitened", layer, train, rank, effort)
        if tick is not None:
            tick()
        return (fit, *output_error_parts(layer, fit, test))

    curves: dict[str, list[Candidate]] = {}
    for name, layer in layers.items():
        curves[name] = []
        for rank in ranks[name]:
            fit, err, energy = scored(layer, rank, shot[name], shot[name])
            keep = keep_fits is not None and keep_fits.get(name) == rank
            cand = Candidate(
                rank,
                adapter.rank_params(layer, rank),
                adapter.rank_dof(layer, rank),
                err / max(energy, 1e-300),
                fit=fit if keep else None,
            )
            best = min((c.train for c in curves[name]), default=math.inf)
            curves[name].append(cand)
            if capped and stops_paying(cand.train, best):
                break
        if len(curves[name]) < len(ranks[name]):
            skipped = len(ranks[name]) - len(curves[name])
            ranks[name] = ranks[name][: len(curves[name])]
            for _ in range(skipped * (1 + len(folds or ()))):  # the progress bar counted them
                if tick is not None:
                    tick()
    if folds:
        totals = {name: [[0.0, 0.0] for _ in ranks[name]] for name in layers}
        for k, held_out in enumerate(folds):
            # one training set at a time: each is as large as all the statistics together
            train = merge_stats([f for j, f in enumerate(folds) if j != k])
            for name, layer in layers.items():
                for total, rank in zip(totals[name], ranks[name]):
                    _, err, energy = scored(layer, rank, train[name], held_out[name])
                    total[0] += err
                    total[1] += energy
        for name in layers:
            for cand, (err, energy) in zip(curves[name], totals[name]):
                cand.heldout = err / max(energy, 1e-300)
    return curves


def stops_paying(train: float, best_below: float) -> bool:
    """Whether a candidate with relative training error ``train`` ends a capped ladder whose
    lower ranks reached ``best_below``: it did not lower the best by CURVE_MIN_GAIN, or the
    best was already an exact fit."""
    return best_below <= CURVE_EXACT or train > (1.0 - CURVE_MIN_GAIN) * best_below


def estimated_errors(
    rule: str, cands: Sequence[Candidate], rows: int, out_features: int, in_features: int
) -> list[float]:
    """Each candidate's estimated relative test error under ``rule`` ("optimism" or "cv");
    in_features: the inputs of one output row (a conv's patch size)."""
    if rule == "cv":
        return [_heldout(c) for c in cands]
    return optimism_estimate(
        [c.train for c in cands], [c.dof for c in cands], rows, out_features, in_features, [None] * len(cands)
    ).tolist()


def _heldout(cand: Candidate) -> float:
    if cand.heldout is None:
        raise ValueError(f"rule 'cv': rank {cand.rank!r} has no held-out error (curves measured without folds)")
    return cand.heldout


def allocate_structured(
    rule: str,
    layers: Mapping[str, nn.Module],
    curves: Mapping[str, Sequence[Candidate]],
    rows: int,
    budget: float,
    weights: Mapping[str, float] | None = None,
    notes: list[str] | None = None,
) -> dict:
    """{layer: chosen rank, or KEEP_DENSE} under ``budget`` (fraction of the layers'
    parameters) by ``rule``; ``weights`` multiply each layer's errors (sensitivities); why the
    budget was left partly unused, if it was, goes to ``notes``."""
    from tensorpress.rank.budget import allocate_ranks

    total = budget * sum(budget_params(m) for m in layers.values())
    if rule == "energy":
        return _energy_threshold(curves, total)
    points = {}
    for name, layer in layers.items():
        weight = cast(Tensor, layer.weight)
        out, fan_in = weight.shape[0], weight[0].numel()
        scale = 1.0 if weights is None else weights[name]
        pts = [
            (c.rank, c.params, scale * e)
            for c, e in zip(curves[name], estimated_errors(rule, curves[name], rows, out, fan_in))
            if math.isfinite(e)
        ]
        pts.append((KEEP_DENSE, budget_params(layer), 0.0))
        points[name] = pts
    allocation = allocate_ranks(points, total)
    note_unused_budget(rule, points, allocation, notes)
    return dict(allocation.ranks)


def _energy_threshold(curves: Mapping[str, Sequence[Candidate]], total: float) -> dict:
    def ranks_for(t):  # {layer: the smallest candidate within t, else its largest}
        return {name: next((c for c in cands if c.train <= t), cands[-1]) for name, cands in curves.items() if cands}

    chosen = ranks_for(fitting_threshold(lambda t: sum(c.params for c in ranks_for(t).values()), total))
    return {name: chosen[name].rank if name in chosen else KEEP_DENSE for name in curves}
