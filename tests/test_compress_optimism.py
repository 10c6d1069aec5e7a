"""compress()'s rank rules charge tensorpress.rank's layer optimism (issue 26 item 2): one
formula, `layer_test_error_ratio`, behind select_layer_rank's estimates and compress()'s curves,
with the fixed-design rule only where the random-design one has no value (rows <= inputs + 1)."""

from __future__ import annotations

import math

import pytest
import torch

from tensorpress.compress.allocate import _optimism_curve, optimism_estimate
from tensorpress.rank import select_layer_rank
from tensorpress.rank.layer import layer_optimism, layer_test_error_ratio
from tensorpress.rank.optimism import estimated_test_error


@pytest.mark.parametrize("rank", [None, 1, 3])
def test_ratio_is_layer_optimism_without_the_rss(rank):
    n, q, p, df, rss = 300, 12, 20, 90, 7.5
    N = n * q
    assert rss / N * layer_test_error_ratio(n, q, p, df, rank=rank) == pytest.approx(
        rss / N + layer_optimism(rss, n, q, p, df, rank=rank), rel=1e-14
    )


def test_select_layer_rank_estimates_use_the_same_ratio():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(16, 24, generator=g, dtype=torch.float64)
    X = torch.randn(400, 24, generator=g, dtype=torch.float64)
    Y = X @ W.T + 0.3 * torch.randn(400, 16, generator=g, dtype=torch.float64)
    sel = select_layer_rank(W, X, family="tt", outputs=Y, candidates=[1, 2, 4])
    for row in sel.table:
        ratio = layer_test_error_ratio(400, 16, 24, row["df"])
        assert row["est_test_error"] == pytest.approx(row["train_error"] * ratio, rel=1e-12)


def test_compress_curve_is_the_layer_rule_rank_by_rank():
    layer = torch.nn.Linear(40, 30)
    rows = 500
    rel = torch.linspace(1.0, 0.05, 31, dtype=torch.float64)
    curve = _optimism_curve(rel, layer, rows)
    for r in (0, 1, 7, 30):
        df = r * (40 + 30 - r) + 30  # the rank-r factors' manifold plus the free bias
        want = rel[r].item() * layer_test_error_ratio(rows, 30, 40, df, rank=r or None)
        assert curve[r].item() == pytest.approx(want, rel=1e-14)


def test_more_inputs_than_rows_falls_back_to_the_fixed_design_rule():
    rows, q, p = 50, 8, 64  # n <= p + 1: random-design optimism has no finite value
    assert math.isinf(layer_test_error_ratio(rows, q, p, 30))
    N = rows * q
    est = optimism_estimate([0.2, 0.0], [30, N], rows, q, p, [None, None])
    assert est[0].item() == pytest.approx(0.2 * N * estimated_test_error(1.0, N, 30.0), rel=1e-14)
    assert math.isinf(est[1].item())  # df >= N - 1: no estimate, never nan
