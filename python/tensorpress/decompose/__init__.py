"""Tensor decompositions as functions with explicit ranks and tolerances."""
from tensorpress.decompose.tt import TTResult, tt_matrix_svd, tt_svd

__all__ = ["TTResult", "tt_svd", "tt_matrix_svd"]
