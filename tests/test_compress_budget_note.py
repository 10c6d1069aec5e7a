"""When a rank rule keeps less than the budget allows, the report says how much and why
(issue 28 item 4)."""

from __future__ import annotations

import torch

import tensorpress as tp
from tensorpress.rank import allocate_ranks
from tensorpress.rank.budget import why_under_budget


def test_why_under_budget_tells_the_cases_apart():
    # layer a's error rises past rank 2 (optimism outgrows the fit), b's falls but its next step is too big
    curves = {
        "a": [(1, 10, 5.0), (2, 20, 3.0), (3, 30, 3.5)],
        "b": [(1, 10, 4.0), (2, 100, 1.0)],
    }
    full = allocate_ranks(curves, 122)
    assert full.ranks == {"a": 2, "b": 2} and why_under_budget(curves, full) is None  # all but 2 used (under 2%)
    stops = allocate_ranks({"a": curves["a"]}, 100)
    why = why_under_budget({"a": curves["a"]}, stops)
    assert stops.ranks == {"a": 2} and "stops improving" in why and "20 of the 100" in why
    coarse = allocate_ranks(curves, 90)
    why = why_under_budget(curves, coarse)
    assert coarse.ranks == {"a": 2, "b": 1} and "too small for the next rank" in why and "(b)" in why


def test_compress_reports_an_unused_budget():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64))
    with torch.no_grad():  # rank-4 weights and few rows: larger ranks only fit noise
        for layer in (model[0], model[2]):
            layer.weight.copy_(torch.randn(64, 4) @ torch.randn(4, 64) / 8 + 0.001 * torch.randn(64, 64))
    calib = [torch.randn(35, 64) for _ in range(2)]
    _, report = tp.compress(model, calib, budget=0.4, rank_rule="optimism")
    assert report.kept_fraction < 0.3
    notes = [n for n in report.notes if n.startswith("rank_rule='optimism' kept")]
    assert len(notes) == 1 and "stops improving" in notes[0]
    assert notes[0] in str(report)
    _, uniform = tp.compress(model, calib, budget=0.4)
    assert not any(n.startswith("rank_rule=") for n in uniform.notes)
