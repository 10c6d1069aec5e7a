"""Rank selection for low-rank tensor regression: the asymptotic-optimism rule, k-fold CV,
AIC/BIC and the energy threshold, with one result type for all (see `select_rank`).

    sel = tensorpress.rank.select_rank("cp", X, y, candidates=range(1, 9))
    sel.rank_, sel.table, sel.plot("ranks.png")     # the 5-fold CV error predicted from one fit per rank
    select_rank("cp", X, y, range(1, 9), criterion="cv")          # the same, measured by 5-fold CV
    select_rank("cp", X, y, range(1, 9), df_rule="bootstrap")   # its resampling check (rank/resampling.py)
    sel = tensorpress.rank.select_layer_rank(layer.weight, calib_inputs, family="lowrank")
    alloc = tensorpress.rank.allocate_ranks({name: [(rank, params, err), ...]}, budget)
"""

from tensorpress.rank.averaging import AveragedRegressor
from tensorpress.rank.budget import Allocation, allocate_ranks
from tensorpress.rank.layer import LayerFit, layer_optimism, select_layer_rank
from tensorpress.rank.optimism import estimated_cv_error, estimated_test_error, optimism
from tensorpress.rank.regressors import CPRegressor, LowRankRegressor, TuckerRegressor
from tensorpress.rank.select import RankSelection, energy_rank, select_rank

__all__ = [
    # estimators (scikit-learn style)
    "CPRegressor",
    "TuckerRegressor",
    "LowRankRegressor",
    "AveragedRegressor",
    # choosing a rank
    "select_rank",
    "RankSelection",
    "energy_rank",
    "select_layer_rank",
    "LayerFit",
    # splitting a parameter budget across layers
    "allocate_ranks",
    "Allocation",
    # the estimates themselves
    "optimism",
    "estimated_test_error",
    "estimated_cv_error",
    "layer_optimism",
]
