"""Tensor decompositions as functions with explicit ranks and tolerances."""

from tensorpress.decompose.cp import CPResult, cp_als, cp_overparam, cp_to_tensor
from tensorpress.decompose.cp_regimes import (
    SymmetricCPResult,
    lazy_gd,
    rich_gd,
    symmetric_cp_tensor,
    tangent_residual,
)
from tensorpress.decompose.tt import TTResult, tt_matrix_svd, tt_round, tt_svd
from tensorpress.decompose.tucker import TuckerResult, feasible_ranks, hosvd, multi_mode_product, tucker

__all__ = [
    "TTResult",
    "tt_svd",
    "tt_matrix_svd",
    "tt_round",
    "TuckerResult",
    "hosvd",
    "tucker",
    "feasible_ranks",
    "multi_mode_product",
    "CPResult",
    "cp_als",
    "cp_overparam",
    "cp_to_tensor",
    "SymmetricCPResult",
    "rich_gd",
    "lazy_gd",
    "symmetric_cp_tensor",
    "tangent_residual",
]
