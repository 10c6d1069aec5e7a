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
from tensorpress.rank.layer import (
    LAYER_FAMILIES,
    LayerFit,
    layer_cv_error,
    layer_optimism,
    rrr_effective_df,
    select_layer_rank,
    tt_degrees_of_freedom,
)
from tensorpress.rank.optimism import aic, bic, estimated_cv_error, estimated_test_error, noise_variance, optimism
from tensorpress.rank.regressors import (
    CPRegressor,
    LowRankRegressor,
    TuckerRegressor,
    cp_degrees_of_freedom,
    matrix_degrees_of_freedom,
    tucker_degrees_of_freedom,
)
from tensorpress.rank.resampling import BootstrapDF, covariance_penalty_df
from tensorpress.rank.select import (
    CRITERIA,
    DF_RULES,
    FAMILIES,
    RankSelection,
    energy_rank,
    one_standard_error_choice,
    select_rank,
)
from tensorpress.rank.stein import stein_degrees_of_freedom

__all__ = [
    "CPRegressor",
    "TuckerRegressor",
    "LowRankRegressor",
    "cp_degrees_of_freedom",
    "tucker_degrees_of_freedom",
    "matrix_degrees_of_freedom",
    "optimism",
    "estimated_test_error",
    "estimated_cv_error",
    "noise_variance",
    "aic",
    "bic",
    "select_rank",
    "RankSelection",
    "energy_rank",
    "one_standard_error_choice",
    "CRITERIA",
    "DF_RULES",
    "FAMILIES",
    "stein_degrees_of_freedom",
    "covariance_penalty_df",
    "BootstrapDF",
    "select_layer_rank",
    "tt_degrees_of_freedom",
    "layer_optimism",
    "layer_cv_error",
    "rrr_effective_df",
    "LayerFit",
    "LAYER_FAMILIES",
    "allocate_ranks",
    "Allocation",
    "AveragedRegressor",
]
