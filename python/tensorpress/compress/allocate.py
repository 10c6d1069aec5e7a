"""Per-layer ranks for a parameter budget.

A layer (out x in) at rank r keeps r (in + out) + out parameters (the compressed layer always
has a bias: the fits leave it free). The budget is the fraction of the targeted layers'
parameters (weights and biases) kept. Rules:

* uniform (rank_rule=None): the same fraction in every layer, the largest r with
  r (in + out) + out <= budget * (in out + bias).
* "optimism": each layer's error curve comes from one SVD of its whitened weight (the
  one-shot statistics): err_l(r) = relative squared output error at rank r, then its
  estimated test error by tensorpress.rank's layer optimism (the layer as a multi-response
  regression of its out outputs on its in inputs over the calibration rows, df = r (in + out - r)
  + out for the bias; `optimism_estimate`), the estimate select_layer_rank uses. Ranks minimizing the
  sum of the layers' relative errors under the total budget are found by
  tensorpress.rank.allocate_ranks. A layer may also stay dense ("keep" candidate: error 0,
  params in * out) when that is where the budget does most good.
* "cv": the same allocation with each layer's curve measured by K-fold cross-validation over
  the calibration batches instead of estimated by the optimism formula (see
  tensorpress.compress.crossval): K fits per layer instead of one, the reference the
  optimism rule is checked against.
* "energy": one threshold t for all layers: each keeps the smallest rank whose relative
  output error is at most t (t found by bisection so that the total fits the budget).
Relative errors are each layer's squared output error over its output energy. Layers do not
matter equally to the model's output, so for "optimism" each layer's curve is multiplied by its
sensitivity: the squared relative error of the model's output when that layer alone is
replaced by its uniform-budget fit, divided by that fit's own relative error (a first-order
model in which the layers' errors add up; see :func:`layer_sensitivity`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from tensorpress.compress.distributed import sum_floats
from tensorpress.compress.lowrank import error_curve, fit_activation
from tensorpress.compress.stats import GramStats
from tensorpress.rank.layer import layer_test_error_ratio
from tensorpress.rank.optimism import estimated_test_error

RANK_RULES = ("optimism", "cv", "energy")
KEEP_DENSE = None  # the rank value meaning "leave this layer as it is"


def dense_params(layer: nn.Linear) -> int:
    return layer.in_features * layer.out_features + (layer.out_features if layer.bias is not None else 0)


def lowrank_params(layer: nn.Linear, rank: int) -> int:
    return rank * (layer.in_features + layer.out_features) + layer.out_features


def lowrank_dof(layer: nn.Linear, rank: int) -> int:
    """Dimension of the rank-r matrices plus the bias the fits leave free."""
    i, o = layer.in_features, layer.out_features
    return rank * (i + o - rank) + o


def max_useful_rank(layer: nn.Linear) -> int:
    """The largest rank that still saves parameters."""
    i, o = layer.in_features, layer.out_features
    return max(1, min(min(i, o), (dense_params(layer) - o - 1) // (i + o)))


def allocate_uniform(layers: Mapping[str, nn.Linear], budget: float) -> dict[str, int]:
    return {
        n: max(
            1,
            min(
                max_useful_rank(m), int((budget * dense_params(m) - m.out_features) // (m.in_features + m.out_features))
            ),
        )
        for n, m in layers.items()
    }


def relative_error_curves(
    layers: Mapping[str, nn.Linear], stats: Mapping[str, GramStats], fits: Mapping | None = None, **fit_kwargs
) -> dict[str, torch.Tensor]:
    """Relative squared output error at ranks 0..k of every layer (one-shot statistics).
    ``fits``: the layers' full-rank whitened fits on these statistics, when already made."""
    curves = {}
    for name, layer in layers.items():
        k = min(layer.in_features, layer.out_features)
        info = (
            fits[name] if fits is not None else fit_activation(layer.weight, layer.bias, stats[name], k, **fit_kwargs)
        ).info
        curves[name] = error_curve(info) / max(info["output_energy"] + _mean_energy(layer, stats[name]), 1e-300)
    return curves


def _mean_energy(layer: nn.Linear, stats: GramStats) -> float:
    w = layer.weight.detach().to(torch.float64)
    mean_out = w @ stats.mean_ref
    if layer.bias is not None:
        mean_out = mean_out + layer.bias.detach().to(torch.float64)
    return stats.n * mean_out.square().sum().item()


def optimism_estimate(
    rel: Sequence[float], dfs: Sequence[int], rows: int, q: int, p: int, ranks: Sequence[int | None]
) -> torch.Tensor:
    """Relative training errors ``rel`` of fits with ``dfs`` degrees of freedom (ranks ``ranks``:
    an int for a reduced-rank fit, None for another structure) of a layer with q outputs and p
    inputs seen on ``rows`` calibration rows -> their estimated relative test errors.

    The estimate is tensorpress.rank's layer optimism (`layer_test_error_ratio`: the layer as
    a multi-response regression on random inputs), the one select_layer_rank charges. Where
    it has no finite value because the layer has at least as many inputs as rows (n <= p + 1,
    e.g. a conv with 65,536-feature patches), the fixed-design rule of
    `tensorpress.rank.optimism.estimated_test_error` over the N = rows * q responses is used
    instead (it asks only df < N - 1); inf where neither is finite."""
    N = rows * q
    out = []
    for e, df, r in zip(rel, dfs, ranks):
        if rows > p + 1:
            ratio = layer_test_error_ratio(rows, q, p, int(df), rank=r)
        else:  # estimated_test_error(RSS, N, df) / (RSS / N): the fixed-design factor
            ratio = N * estimated_test_error(1.0, N, float(df))
        out.append(math.inf if math.isinf(ratio) else float(e) * ratio)  # (0 * inf would be nan)
    return torch.tensor(out, dtype=torch.float64)


def _optimism_curve(rel: torch.Tensor, layer: nn.Linear, rows: int) -> torch.Tensor:
    """rel (ranks 0..k) -> estimated relative test error (see optimism_estimate); rank 0 is
    the bias alone."""
    ranks = range(rel.shape[0])
    dfs = [lowrank_dof(layer, r) for r in ranks]
    return optimism_estimate(rel.tolist(), dfs, rows, layer.out_features, layer.in_features, [r or None for r in ranks])


def allocate_by_rule(
    rule: str,
    layers: Mapping[str, nn.Linear],
    stats: Mapping[str, GramStats],
    budget: float,
    curves: Mapping[str, torch.Tensor] | None = None,
    weights: Mapping[str, float] | None = None,
    heldout: Mapping[str, torch.Tensor] | None = None,
    notes: list[str] | None = None,
    **fit_kwargs,
) -> dict[str, int | None]:
    """Ranks by ``rule`` (see the module docstring). curves: the layers' relative error
    curves if already computed; weights: per-layer multipliers of the errors (the measured
    sensitivity of the model's output to each layer's error; 1 when None); heldout: the
    cross-validated curves (tensorpress.compress.crossval.cv_error_curves), needed by "cv"."""
    if rule not in RANK_RULES:
        raise ValueError(f"rank_rule: expected one of {RANK_RULES}, got {rule!r}")
    if rule == "cv" and heldout is None:
        raise ValueError("heldout: rank_rule='cv' needs the cross-validated error curves")
    rel = dict(curves) if curves is not None else relative_error_curves(layers, stats, **fit_kwargs)
    total = budget * sum(dense_params(m) for m in layers.values())
    if rule == "energy":
        return dict(_energy_threshold(layers, rel, total))
    from tensorpress.rank.budget import allocate_ranks

    candidates: dict[str, list[tuple[int | None, int, float]]] = {}
    for name, layer in layers.items():
        rows = stats[name].n
        if rule == "cv":
            assert heldout is not None  # checked on entry
            est = heldout[name]
        else:
            est = _optimism_curve(rel[name], layer, rows)
        est = est * (1.0 if weights is None else weights[name])
        pts: list[tuple[int | None, int, float]] = [
            (r, lowrank_params(layer, r), est[r].item())
            for r in range(1, max_useful_rank(layer) + 1)
            if torch.isfinite(est[r])
        ]
        pts.append((KEEP_DENSE, dense_params(layer), 0.0))
        candidates[name] = pts
    allocation = allocate_ranks(candidates, total)
    note_unused_budget(rule, candidates, allocation, notes)
    return dict(allocation.ranks)


def note_unused_budget(rule: str, curves, allocation, notes: list[str] | None) -> None:
    """Say in ``notes`` why the rule left part of the budget unused (rank.budget.why_under_budget)."""
    from tensorpress.rank.budget import why_under_budget

    why = why_under_budget(curves, allocation)
    if why is not None and notes is not None:
        notes.append(f"rank_rule={rule!r} {why}")


def _energy_threshold(layers, rel, total) -> dict[str, int]:
    def ranks_for(t):
        out = {}
        for name, layer in layers.items():
            top = max_useful_rank(layer)
            ok = (rel[name][1 : top + 1] <= t).nonzero()
            out[name] = int(ok[0]) + 1 if ok.numel() else top
        return out

    return ranks_for(
        fitting_threshold(lambda t: sum(lowrank_params(layers[n], r) for n, r in ranks_for(t).items()), total)
    )


def fitting_threshold(params_at, total: float) -> float:
    """The strictest relative-error threshold t in [0, 1] with params_at(t) <= total, by
    bisection (params_at falls as t grows); 1 when even t = 1 is over the budget (the
    smallest ranks: the budget is below them)."""
    lo, hi = 0.0, 1.0  # lo too strict (over budget), hi loose enough
    if params_at(hi) > total:
        return hi
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if params_at(mid) <= total:
            hi = mid
        else:
            lo = mid
    return hi


def layer_sensitivity(
    model: nn.Module,
    batches,
    layers: Mapping[str, nn.Linear],
    fits: Mapping[str, nn.Module],
    layer_errors: Mapping[str, float],
) -> dict[str, float]:
    """For each layer: (relative squared change of the model's output when ``fits[name]``
    alone replaces it) / layer_errors[name]. ``model`` is modified in place and restored;
    ``layers`` are its own modules."""
    from tensorpress.compress.calibrate import call_model
    from tensorpress.compress.shared import swap_module

    def outputs():
        with torch.no_grad():
            return [_first_tensor(call_model(model, b)).double() for b in batches]

    reference = outputs()
    energy = sum(r.square().sum().item() for r in reference)
    errs = []
    for name, layer in layers.items():
        # under every name the layer has: a module registered twice is replaced at both places
        swap_module(model, layer, fits[name])
        try:
            errs.append(sum((o - r).square().sum().item() for o, r in zip(outputs(), reference)))
        finally:
            swap_module(model, fits[name], layer)
    # under torch.distributed each process measured its share of the batches
    energy, *errs = sum_floats([energy] + errs)
    return {name: (err / max(energy, 1e-300)) / max(layer_errors[name], 1e-12) for name, err in zip(layers, errs)}


def _first_tensor(output):
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        return _first_tensor(next(iter(output.values())))
    if isinstance(output, (tuple, list)):
        return _first_tensor(output[0])
    for key in ("last_hidden_state", "logits"):
        if hasattr(output, key):
            return getattr(output, key)
    raise TypeError(f"model: cannot find a tensor in its output of type {type(output).__name__}")
