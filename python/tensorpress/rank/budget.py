"""Per-layer ranks under a total parameter budget.

Given, for every layer, candidate ranks with their parameter count and estimated error (e.g.
the est_test_error or train error column of `select_layer_rank`, scaled as the caller wants
the errors to add up), pick one candidate per layer to

    minimize sum_l err_l(c_l)   subject to   sum_l params_l(c_l) <= budget,

a multiple-choice knapsack problem. Two methods:

* "dp": exact dynamic programming over the integer budget, O(sum_l C_l * (budget + 1)) time
  and O(L * (budget + 1)) bytes; needs integer parameter counts.
* "lagrangian": each layer's curve is reduced to its undominated points and their lower
  convex hull (in the (params, error) plane); hull segments are taken in order of decreasing
  error reduction per parameter (the Lagrangian relaxation: the continuous version of the
  problem is solved exactly by this greedy, and its value, with the first segment that does
  not fit taken fractionally, is a lower bound on the optimum); then a greedy fill spends the
  remaining budget on the single-layer moves (to any candidate, hull or not) that reduce the
  error most, until none fits. The result's `gap` = error - lower_bound bounds its distance
  from the optimum; it is at most the error drop of one hull segment (in practice tiny when
  there are many layers). O(sum_l C_l log sum_l C_l) plus the fill.
* "auto" (default): "dp" when the parameter counts are integers and the DP costs at most
  ~1e7 cell updates, else "lagrangian".
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Allocation", "allocate_ranks"]

_DP_MAX_CELLS = 10_000_000


@dataclass
class Allocation:
    """ranks: {layer: chosen rank}; params: their total parameters; error: their summed error;
    lower_bound: a lower bound on the optimal summed error (the Lagrangian/convex relaxation;
    equal to error for "dp"); gap = error - lower_bound (0 when exact); method: "dp" or
    "lagrangian"; choices: {layer: index of the chosen candidate in that layer's curve}."""

    ranks: dict
    params: float
    error: float
    lower_bound: float
    gap: float
    method: str
    budget: float
    choices: dict = field(default_factory=dict)

    def __str__(self):
        lines = [
            f"Allocation(method={self.method!r}, params={self.params:g} / budget {self.budget:g}, "
            f"error={self.error:.6g}, gap<={self.gap:.3g})"
        ]
        lines += [f"  {name}: rank {r!r}" for name, r in self.ranks.items()]
        return "\n".join(lines)


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _check(curves, budget):
    if not isinstance(curves, Mapping) or len(curves) == 0:
        raise ValueError(
            f"curves: expected a non-empty dict {{layer: [(rank, params, error), ...]}}, got "
            f"{type(curves).__name__ if not isinstance(curves, Mapping) else 'an empty dict'}"
        )
    if not _is_number(budget) or not math.isfinite(budget) or budget < 0:
        raise ValueError(f"budget: expected a finite number >= 0 (total parameters), got {budget!r}")
    parsed = {}
    for name, curve in curves.items():
        if isinstance(curve, (str, bytes)) or not hasattr(curve, "__iter__"):
            raise ValueError(f"curves[{name!r}]: expected a list of (rank, params, error), got {curve!r}")
        pts = list(curve)
        if not pts:
            raise ValueError(f"curves[{name!r}]: expected at least one (rank, params, error), got an empty list")
        for i, pt in enumerate(pts):
            if not isinstance(pt, (tuple, list)) or len(pt) != 3:
                raise ValueError(f"curves[{name!r}][{i}]: expected a (rank, params, error) triple, got {pt!r}")
            _, p, e = pt
            if not _is_number(p) or not math.isfinite(p) or p < 0:
                raise ValueError(f"curves[{name!r}][{i}]: params expected a finite number >= 0, got {p!r}")
            if not _is_number(e) or not math.isfinite(e):
                raise ValueError(f"curves[{name!r}][{i}]: error expected a finite number, got {e!r}")
        parsed[name] = [(pt[0], float(pt[1]), float(pt[2])) for pt in pts]
    smallest = sum(min(p for _, p, _ in pts) for pts in parsed.values())
    if smallest > budget:
        raise ValueError(
            f"budget: {budget:g} parameters is less than {smallest:g}, the total of every layer's "
            f"smallest candidate; raise the budget or add smaller ranks"
        )
    return parsed


def _frontier(pts):
    """Indices of the undominated points, by increasing params (and strictly decreasing error)."""
    order = sorted(range(len(pts)), key=lambda i: (pts[i][1], pts[i][2]))
    out, best = [], math.inf
    for i in order:
        if pts[i][2] < best:
            out.append(i)
            best = pts[i][2]
    return out


def _lower_hull(pts, idx):
    """Lower convex hull (monotone chain) of the frontier points idx (sorted by params)."""
    hull: list[int] = []
    for i in idx:
        x, y = pts[i][1], pts[i][2]
        while len(hull) >= 2:
            x1, y1 = pts[hull[-2]][1], pts[hull[-2]][2]
            x2, y2 = pts[hull[-1]][1], pts[hull[-1]][2]
            # drop hull[-1] if it lies on or above the segment hull[-2] -> i
            if (y2 - y1) * (x - x1) >= (y - y1) * (x2 - x1):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def _lagrangian(parsed, budget):
    names = list(parsed)
    cur = {}
    hulls = {}
    heap: list[tuple] = []
    for li, name in enumerate(names):
        pts = parsed[name]
        hull = _lower_hull(pts, _frontier(pts))
        hulls[name] = hull
        cur[name] = 0  # position on the hull
        for j in range(len(hull) - 1):
            a, b = pts[hull[j]], pts[hull[j + 1]]
            dp, de = b[1] - a[1], a[2] - b[2]
            eff = de / dp if dp > 0 else math.inf
            heapq.heappush(heap, (-eff, j, li, name))
    choice = {name: hulls[name][0] for name in names}
    used = sum(parsed[n][choice[n]][1] for n in names)
    err = sum(parsed[n][choice[n]][2] for n in names)
    lower = None
    blocked = set()
    # segments come out by decreasing efficiency; within a layer that is hull order
    while heap:
        _, j, _, name = heapq.heappop(heap)
        if name in blocked or cur[name] != j:
            continue
        pts, hull = parsed[name], hulls[name]
        a, b = pts[hull[j]], pts[hull[j + 1]]
        dp, de = b[1] - a[1], a[2] - b[2]
        if used + dp <= budget:
            used += dp
            err -= de
            cur[name] = j + 1
            choice[name] = hull[j + 1]
        else:
            if lower is None:  # the relaxation takes this segment fractionally
                frac = (budget - used) / dp if dp > 0 else 0.0
                lower = err - frac * de
            blocked.add(name)
    if lower is None:
        lower = err  # every hull segment fitted: the relaxation is integral
    # greedy fill: the best single-layer move that fits, until none improves
    arrays = {
        name: (np.array([p for _, p, _ in parsed[name]]), np.array([e for _, _, e in parsed[name]])) for name in names
    }
    while True:
        best = None
        room = budget - used
        for name in names:
            P, E = arrays[name]
            cp, ce = P[choice[name]], E[choice[name]]
            gain = np.where((E < ce) & (P - cp <= room), ce - E, -np.inf)
            i = int(np.argmax(gain))
            if gain[i] > 0 and (best is None or gain[i] > best[0]):
                best = (float(gain[i]), name, i, float(P[i] - cp))
        if best is None:
            break
        best_gain, name, i, dp = best
        choice[name] = i
        used += dp
        err -= best_gain
    return choice, lower


def _dp(parsed, budget):
    names = list(parsed)
    B = int(math.floor(budget))
    INF = np.inf
    best = np.zeros(B + 1)  # best[b]: min error of the layers so far within b params
    picks = []
    for name in names:
        pts = parsed[name]
        new = np.full(B + 1, INF)
        arg = np.full(B + 1, -1, dtype=np.int32)
        for i in _frontier(pts):
            p, e = int(pts[i][1]), pts[i][2]
            if p > B:
                continue
            cand = np.full(B + 1, INF)
            cand[p:] = best[: B + 1 - p] + e
            better = cand < new
            new[better] = cand[better]
            arg[better] = i
        best = new
        picks.append(arg)
    b = int(np.argmin(best))  # best is non-increasing in b; argmin = smallest b at the min
    choice = {}
    for name, arg in zip(reversed(names), reversed(picks)):
        i = int(arg[b])
        choice[name] = i
        b -= int(parsed[name][i][1])
    return choice


def allocate_ranks(curves: Mapping[Any, Any], budget: float, method: str = "auto") -> Allocation:
    """Pick one (rank, params, error) per layer minimizing the summed error under a total
    parameter budget (see the module docstring for the methods and their optimality).

    Args:
        curves: {layer name: [(rank, params, error), ...]}: each layer's candidates (any rank
            labels, e.g. ints, tuples or "full" for the uncompressed layer), params >= 0,
            error finite (the same units for every layer, since they are summed).
        budget: total parameters allowed (>= the sum of every layer's smallest params).
        method: "auto", "dp" (exact; integer params) or "lagrangian" (convex hull + greedy fill,
            with a certified gap).
    Returns:
        Allocation(ranks, params, error, lower_bound, gap, method, budget, choices).
    Raises:
        ValueError naming the argument for malformed curves, a negative budget, or a budget
        below the smallest possible total.
    """
    if method not in ("auto", "dp", "lagrangian"):
        raise ValueError(f"method: expected 'auto', 'dp' or 'lagrangian', got {method!r}")
    parsed = _check(curves, budget)
    integral = all(float(p).is_integer() for pts in parsed.values() for _, p, _ in pts)
    if method == "dp" and not integral:
        raise ValueError("method: 'dp' needs integer parameter counts in curves; use 'lagrangian'")
    cells = sum(len(p) for p in parsed.values()) * (math.floor(budget) + 1)
    if method == "auto":
        method = "dp" if integral and cells <= _DP_MAX_CELLS else "lagrangian"
    if method == "dp":
        choice = _dp(parsed, budget)
        lower = None
    else:
        choice, lower = _lagrangian(parsed, budget)
    ranks = {name: parsed[name][i][0] for name, i in choice.items()}
    ranks = {name: ranks[name] for name in parsed}
    params = sum(parsed[name][choice[name]][1] for name in parsed)
    error = sum(parsed[name][choice[name]][2] for name in parsed)
    if lower is None:
        lower = error
    lower = min(lower, error)
    return Allocation(
        ranks=ranks,
        params=params,
        error=error,
        lower_bound=lower,
        gap=max(error - lower, 0.0),
        method=method,
        budget=float(budget),
        choices={name: choice[name] for name in parsed},
    )


def why_under_budget(curves: Mapping[Any, Any], allocation: Allocation, min_slack: float = 0.02) -> str | None:
    """Why an allocation keeps fewer parameters than its budget allows, in words (None when it
    uses all but ``min_slack`` of the budget): every larger rank has a higher error (the error
    estimate stops improving; for the optimism rule the charged optimism grows faster than the
    training error falls), or the layers whose error would still fall need more parameters than
    are left (their next steps, e.g. keeping a layer dense: rank label None, are too coarse), or,
    for an approximate (Lagrangian) allocation, its gap."""
    slack = allocation.budget - allocation.params
    if allocation.budget <= 0 or slack <= min_slack * allocation.budget:
        return None
    fits, too_big, dense_only = [], [], 0
    for name, pts in curves.items():
        _, p0, e0 = pts[allocation.choices[name]]
        lower = [(r, p - p0) for r, p, e in pts if p > p0 and e < e0]
        if any(extra <= slack for _, extra in lower):
            fits.append(str(name))
        elif any(r is not None for r, _ in lower):
            too_big.append(str(name))
        elif lower:
            dense_only += 1
    used = f"kept {allocation.params:,.0f} of the {allocation.budget:,.0f} parameters the budget allows"
    if fits:
        return f"{used}: the {allocation.method} allocation's gap (lower errors fit for {', '.join(fits)})"
    if too_big:
        layers = ", ".join(too_big)
        return f"{used}: the rest is too small for the next rank of the layers whose error would still fall ({layers})"
    why = f"{used}: every larger rank has a higher estimated error than the one chosen (the estimate stops improving)"
    if dense_only:
        why += "; keeping a layer dense would lower it but needs more parameters than are left"
    return why
