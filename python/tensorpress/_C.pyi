"""Type stub of tensorpress._C, the native extension (csrc/bindings/*.cpp: keep the two in step).

Tensors cross through DLPack: every tensor argument is borrowed, never copied, so it must
already have the dtype, device, shape and layout the function checks for (the Python
wrappers in tensorpress.ops and tensorpress.linalg prepare them). Outputs are written in place.
"""

from collections.abc import Sequence
from typing import Any, Protocol

class _DLPackTensor(Protocol):
    """What the extension borrows: an object exporting DLPack (a torch.Tensor in practice)."""

    def __dlpack__(self, *args: Any, **kwargs: Any) -> Any: ...
    def __dlpack_device__(self) -> Any: ...

# ---- TT matmul (CPU or CUDA by x's device; tables / path / stream are used on CUDA only) ----
def tt_forward(
    x: _DLPackTensor,
    mats: list[Any],  # a list (py::list) of the step matrices, DLPack tensors
    core_dims: Sequence[int],
    order: Sequence[int],
    out: _DLPackTensor,
    workspace: _DLPackTensor,
    threads: int,
    tables: _DLPackTensor | None = None,
    path: str = "auto",
    stream: int | None = None,
    bias: _DLPackTensor | None = None,
    tensor_cores: bool = False,  # CUDA only: the tiled path's tensor-core variant
) -> None: ...
def tt_backward(
    x: _DLPackTensor,
    mats: list[Any],  # a list (py::list) of the step matrices, DLPack tensors
    core_dims: Sequence[int],
    order: Sequence[int],
    grad_out: _DLPackTensor,
    grad_x: _DLPackTensor | None,
    grad_mats: list[Any],  # a list of DLPack tensors, None where that gradient is not wanted
    workspace: _DLPackTensor,
    threads: int,
    tables: _DLPackTensor | None = None,
    path: str = "auto",
    stream: int | None = None,
    grad_bias: _DLPackTensor | None = None,
    tensor_cores: bool = False,  # CUDA only: the tiled path's tensor-core variant
) -> None: ...
def tt_cuda_schedule(
    core_dims: Sequence[int],
    order: Sequence[int],
    batch: int,
    backward: bool,
    acc_bytes: int,
    smem_per_block: int,
    smem_per_sm: int,
    sm_count: int,
    path: str = "auto",
    tensor_cores: bool = False,
) -> dict[str, Any]: ...
def tt_cuda_tables(core_dims: Sequence[int], order: Sequence[int]) -> list[int]: ...
def tt_plan_info(core_dims: Sequence[int], order: Sequence[int]) -> dict[str, Any]: ...
def tt_workspace_size(
    core_dims: Sequence[int], order: Sequence[int], batch: int, threads: int, backward: bool, elem_bytes: int
) -> int: ...

# ---- only in builds with the CUDA kernels (build_info()["cuda"]); absent otherwise ----
def tt_cuda_device_limits(device: int) -> dict[str, int]: ...
def svd_jacobi_cuda(
    A: _DLPackTensor,
    U: _DLPackTensor,
    S: _DLPackTensor,
    Vh: _DLPackTensor,
    tol: float,
    max_sweeps: int,
    stream: int,
) -> None: ...

# ---- one-sided Jacobi SVD (CPU), BLAS ----
def svd_jacobi(
    A: _DLPackTensor,
    U: _DLPackTensor,
    S: _DLPackTensor,
    Vh: _DLPackTensor,
    workspace: _DLPackTensor,
    tol: float,
    max_sweeps: int,
    threads: int,
) -> int: ...
def svd_jacobi_workspace_size(m: int, n: int, threads: int) -> int: ...
def svd_jacobi_cuda_smem_bytes(m: int, n: int) -> int: ...
def blas_gemm(
    a: _DLPackTensor,
    b: _DLPackTensor,
    out: _DLPackTensor,
    transpose_a: bool,
    transpose_b: bool,
    alpha: float,
    beta: float,
    threads: int,
) -> None: ...
def blas_trsm(A: _DLPackTensor, B: _DLPackTensor, left: bool, upper: bool, transpose: bool, threads: int) -> None: ...
def build_info() -> dict[str, Any]: ...
