"""Linear algebra kernels: batched truncated SVD."""

from tensorpress.linalg.svd import SVDResult, cholesky_qr2, svd_method, truncated_svd

__all__ = ["SVDResult", "truncated_svd", "svd_method", "cholesky_qr2"]
