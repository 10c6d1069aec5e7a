"""Rank selection for low-rank tensor regression: the asymptotic-optimism rule, k-fold CV,
AIC/BIC and the energy threshold, with one result type for all (see `select_rank`).

    sel = tensorpress.rank.select_rank("cp", X, y, candidates=range(1, 9))
    sel.rank_, sel.table, sel.plot("ranks.png")
"""
from tensorpress.rank.optimism import aic, bic, estimated_test_error, noise_variance, optimism
from tensorpress.rank.regressors import (CPRegressor, LowRankRegressor, TuckerRegressor, cp_degrees_of_freedom,
                                         matrix_degrees_of_freedom, tucker_degrees_of_freedom)
from tensorpress.rank.select import CRITERIA, FAMILIES, RankSelection, energy_rank, select_rank

__all__ = ["CPRegressor", "TuckerRegressor", "LowRankRegressor", "cp_degrees_of_freedom",
           "tucker_degrees_of_freedom", "matrix_degrees_of_freedom", "optimism", "estimated_test_error",
           "noise_variance", "aic", "bic", "select_rank", "RankSelection", "energy_rank", "CRITERIA", "FAMILIES"]
