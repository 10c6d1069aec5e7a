"""With a rank rule, Tucker's (r_out, r_in) split is chosen by the fit, not only by the channel
ratio (issue 28 item 4): splits away from the ratio compete on their measured errors."""

from __future__ import annotations

import torch

import tensorpress as tp
from tensorpress.compress.structured_rules import candidate_ranks
from tensorpress.compress.structures import ADAPTERS


def _model():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(16, 128, 3, padding=1)
    with torch.no_grad():  # exact Tucker-2 ranks (14 out, 16 in): every input channel matters
        core = torch.randn(14, 16, 3, 3)
        u = torch.linalg.qr(torch.randn(128, 14))[0]
        conv.weight.copy_(torch.einsum("ak,kchw->achw", u, core) * 0.1)
    return torch.nn.Sequential(conv, torch.nn.ReLU(), torch.nn.Conv2d(128, 8, 1))


def test_variants_keep_the_parameter_count():
    tucker = ADAPTERS["tucker"]
    conv = torch.nn.Conv2d(16, 128, 3)
    rank = tucker.uniform_rank(conv, 0.25)
    variants = tucker.rank_variants(conv, rank)
    assert variants and all(v != rank for v in variants)
    assert all(tucker.params(conv, *v) <= tucker.params(conv, *rank) for v in variants)
    assert set(variants) <= set(candidate_ranks(tucker, conv, 0.25))


def test_rank_rule_picks_the_split_the_data_needs():
    model = _model()
    calib = [torch.randn(8, 16, 12, 12) for _ in range(4)]
    kw = dict(structure="tucker", method="whitened", budget=0.25, include=["0"])
    _, uniform = tp.compress(model, calib, **kw)
    _, ruled = tp.compress(model, calib, rank_rule="optimism", **kw)
    u, r = uniform.layers[0], ruled.layers[0]
    assert u.rank[1] < 16 and u.rel_error > 0.5  # the channel ratio leaves out most input channels
    assert r.rank == (14, 16) and r.rel_error < 1e-4
    assert r.params_after <= u.params_after
