"""tensorpress.tt_format, the one home of the TT-matrix format, against float64 references
written out index by index."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from tensorpress.tt_format import (
    balanced_factors,
    capped_ranks,
    core_stds,
    cores_to_dense,
    matrix_to_tt_tensor,
    max_bond_ranks,
    resolve_factors,
    tt_params,
)


def _dense_by_entries(cores, out_factors, in_factors):
    """W[(i_1..i_d), (j_1..j_d)] = G_1[:, i_1, j_1, :] ... G_d[:, i_d, j_d, :], row-major."""
    M, N = math.prod(out_factors), math.prod(in_factors)
    W = torch.zeros(M, N, dtype=torch.float64)
    for i in itertools.product(*map(range, out_factors)):
        for j in itertools.product(*map(range, in_factors)):
            v = torch.ones(1, 1, dtype=torch.float64)
            for g, a, b in zip(cores, i, j):
                v = v @ g[:, a, b, :]
            W[np.ravel_multi_index(i, out_factors), np.ravel_multi_index(j, in_factors)] = v[0, 0]
    return W


@pytest.mark.parametrize("out_f,in_f,ranks", [((2, 3), (3, 2), (2,)), ((2, 3, 2), (2, 2, 3), (3, 2)), ((4,), (5,), ())])
def test_cores_to_dense_matches_the_definition_with_and_without_batch(out_f, in_f, ranks):
    gen = torch.Generator().manual_seed(0)
    full = (1, *ranks, 1)
    batch = [
        [
            torch.randn(full[k], m, n, full[k + 1], generator=gen, dtype=torch.float64)
            for k, (m, n) in enumerate(zip(out_f, in_f))
        ]
        for _ in range(3)
    ]
    for cores in batch:
        torch.testing.assert_close(cores_to_dense(cores), _dense_by_entries(cores, out_f, in_f), rtol=1e-12, atol=1e-12)
    stacked = [torch.stack([cores[k] for cores in batch]) for k in range(len(out_f))]
    torch.testing.assert_close(
        cores_to_dense(stacked), torch.stack([_dense_by_entries(c, out_f, in_f) for c in batch]), rtol=1e-12, atol=1e-12
    )


def test_matrix_to_tt_tensor_pairs_row_and_column_factors():
    out_f, in_f = (2, 3), (4, 5)
    W = torch.arange(6 * 20, dtype=torch.float64).reshape(6, 20)
    t = matrix_to_tt_tensor(W, out_f, in_f)
    assert t.shape == (8, 15)
    for i1, i2, j1, j2 in itertools.product(range(2), range(3), range(4), range(5)):
        assert t[i1 * 4 + j1, i2 * 5 + j2] == W[i1 * 3 + i2, j1 * 5 + j2]
    batched = matrix_to_tt_tensor(torch.stack([W, -W]), out_f, in_f)
    torch.testing.assert_close(batched, torch.stack([t, -t]))


def test_rank_caps_and_parameter_count():
    out_f, in_f = (2, 4, 2), (3, 2, 2)
    assert max_bond_ranks(out_f, in_f) == [6, 4]
    assert capped_ranks(5, out_f, in_f) == (5, 4)
    assert tt_params(out_f, in_f, (5, 4)) == 1 * 6 * 5 + 5 * 8 * 4 + 4 * 4 * 1


def test_resolve_factors_checks_and_balances():
    assert resolve_factors(1024, 64, None, None) == (balanced_factors(1024, 4), balanced_factors(64, 4))
    assert resolve_factors(12, 10, (3, 4), None) == ((3, 4), (2, 5))
    assert resolve_factors(12, 10, [np.int64(3), 4], None)[0] == (3, 4)
    with pytest.raises(ValueError, match=r"^layer a: in_factors: expected factors whose product is 12"):
        resolve_factors(12, 10, (3, 5), None, where="layer a: ")
    with pytest.raises(ValueError, match=r"^out_factors: expected 2 positive ints, got \(True, 10\)"):
        resolve_factors(12, 10, None, (True, 10))
    with pytest.raises(ValueError, match=r"^out_features=7 cannot be split"):
        resolve_factors(12, 7, (3, 4), None)


def test_core_stds_give_the_requested_weight_variance():
    gen = torch.Generator().manual_seed(1)
    out_f, in_f, ranks = (4, 4, 4), (4, 4, 4), (6, 5)
    full = (1, *ranks, 1)
    draws = []
    for _ in range(40):
        cores = [
            torch.randn(full[k], m, n, full[k + 1], generator=gen, dtype=torch.float64) * s
            for k, ((m, n), s) in enumerate(zip(zip(out_f, in_f), core_stds(ranks, 0.01)))
        ]
        draws.append(cores_to_dense(cores).flatten())
    var = torch.cat(draws).var().item()
    assert 0.008 < var < 0.012  # 40 x 4096 entries, correlated within a draw: a loose band around 0.01
