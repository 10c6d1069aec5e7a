"""Every structure compress() offers implements the whole adapter interface (issue 26 item 3),
and the low-rank adapter agrees with the budget arithmetic it replaced in api.py."""

from __future__ import annotations

import pytest
import torch

from tensorpress.compress.allocate import allocate_uniform, lowrank_params
from tensorpress.compress.lowrank import fit_activation
from tensorpress.compress.stats import GramStats
from tensorpress.compress.structures import ADAPTERS, StructureAdapter


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_every_adapter_implements_the_protocol(name):
    adapter = ADAPTERS[name]
    assert isinstance(adapter, StructureAdapter) and adapter.name == name
    for attr in ("uniform_rank", "rank_params", "rank_dof", "check_rank", "fit", "module", "macs_per_row"):
        assert callable(getattr(adapter, attr))


def test_lowrank_adapter_matches_the_budget_rules_and_fits():
    lr = ADAPTERS["lowrank"]
    layer = torch.nn.Linear(48, 32)
    for budget in (0.1, 0.5, 0.9):
        assert lr.uniform_rank(layer, budget) == allocate_uniform({"x": layer}, budget)["x"]
    assert lr.rank_params(layer, 5) == lowrank_params(layer, 5)
    assert lr.rank_dof(layer, 5) == 5 * (48 + 32 - 5) + 32
    with pytest.raises(ValueError, match=r"^ranks: layer 'fc' \(32x48\) needs a rank in \[1, 32\], got 33"):
        lr.check_rank("fc", layer, 33)
    with pytest.raises(ValueError, match="needs a rank"):
        lr.check_rank("fc", layer, True)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 48, generator=gen)
    stats = GramStats(48, paired=True)
    stats.update(x, x)
    fit = lr.fit("activation", layer, stats, 6, {})
    ref = fit_activation(layer.weight, layer.bias, stats, 6)
    torch.testing.assert_close(fit.weight(), ref.weight())
    module = lr.module(layer, fit)
    assert lr.report_rank(fit) == 6 and lr.macs_per_row(layer, module) == 6 * (48 + 32)
    torch.testing.assert_close(module(x).double(), x.double() @ fit.weight().T + fit.bias, rtol=1e-5, atol=1e-5)
