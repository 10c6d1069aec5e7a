"""The one-standard-error rule on the estimated test errors (criterion="test_error_1se")."""

import math

import pytest
import torch

from _util import planted_matrix
from tensorpress.rank import select_layer_rank, select_rank
from tensorpress.rank.regressors import matrix_degrees_of_freedom
from tensorpress.rank.select import CRITERIA, choose, one_standard_error_choice


def test_the_smallest_candidate_within_one_standard_error():
    est, dfe, df = [1.0, 0.95, 0.94], [10.0, 20.0, 90.0], [10, 20, 90]
    # n = 100: the least estimate (0.94) has 10 residual df, se = 0.94 sqrt(2/10) = 0.42: all within
    assert one_standard_error_choice(est, dfe, df, 100) == 0
    # n = 10,000: se = 0.94 sqrt(2/9910) = 0.013: 0.95 is within, 1.0 is not
    assert one_standard_error_choice(est, dfe, df, 10_000) == 1
    # an infinite estimate is never chosen; none finite -> None
    assert one_standard_error_choice([math.inf, 2.0, None], dfe, df, 100) == 1
    assert one_standard_error_choice([math.inf, None], dfe[:2], df[:2], 100) is None
    # ties in df are broken by the estimate
    assert one_standard_error_choice([1.0, 0.99], [10.0, 10.0], [10, 10], 50) == 1


def test_choose_is_the_argmin_for_every_other_criterion():
    table = [{"df": 10, "df_eff": 10.0}, {"df": 20, "df_eff": 20.0}, {"df": 30, "df_eff": 30.0}]
    assert choose("test_error", table, [1.0, 0.9, 0.9], 100) == 1  # ties go to the smaller df
    assert choose("test_error_1se", table, [1.0, 0.9, 0.9], 100) == 0
    assert "test_error_1se" in CRITERIA


@pytest.mark.parametrize("seed", [0, 1])
def test_select_rank_with_the_rule(seed):
    R, p = 3, 10
    X, y = planted_matrix(p, R, 8 * matrix_degrees_of_freedom(R, p, p), 10.0, seed)
    plain = select_rank("lowrank", X, y, range(1, 6), criterion="test_error", random_state=seed)
    sel = select_rank("lowrank", X, y, range(1, 6), criterion="test_error_1se", random_state=seed)
    assert sel.rank_ == R and sel.criterion == "test_error_1se"
    assert sel.scores_ == plain.scores_  # the same estimates, a different choice rule
    i = one_standard_error_choice(sel.scores_, sel.column("df_eff"), sel.column("df"), X.shape[0])
    assert sel.rank_ == sel.candidates[i] and sel.estimator_ is sel.estimators_[i]


@pytest.mark.slow
def test_the_rule_prefers_the_smaller_rank_at_few_samples():
    # n barely above the df of rank 3: its estimate is too noisy to be trusted over rank 1
    picks, plain_picks = [], []
    for seed in range(6):
        X, y = planted_matrix(8, 1, 60, 2.0, seed)
        sel = select_rank("lowrank", X, y, [1, 2, 3], criterion="test_error_1se", random_state=seed)
        plain = select_rank("lowrank", X, y, [1, 2, 3], criterion="test_error", random_state=seed)
        assert sel.rank_ <= plain.rank_
        picks.append(sel.rank_)
        plain_picks.append(plain.rank_)
    assert picks == [1] * 6 and max(plain_picks) > 1  # the plain argmin over-ranks at least once


def test_layer_selection_with_the_rule():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(12, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 16, generator=g, dtype=torch.float64)
    X = torch.randn(400, 16, generator=g, dtype=torch.float64)
    Y = X @ W.T + 0.1 * torch.randn(400, 12, generator=g, dtype=torch.float64)
    sel = select_layer_rank(W, X, outputs=Y, candidates=[1, 2, 3, 6], criterion="test_error_1se", random_state=0)
    assert sel.rank_ == 3 and sel.criterion == "test_error_1se"
    with pytest.raises(ValueError, match="criterion"):
        select_layer_rank(W, X, outputs=Y, candidates=[1], criterion="1se")
