"""TT-matrix contraction y = x W^T with W held as TT cores.

Cores G_k have shape (r_{k-1}, m_k, n_k, r_k), r_0 = r_d = 1; W is (prod m_k, prod n_k) with
row-major flattening (factor 0 most significant). The kernels live in csrc/tt/: the CPU
fused kernel, and on CUDA a fused (shared-memory) and a tiled kernel; x may be float16 or
bfloat16 on CUDA (the step matrices and the accumulation stay float32).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

import torch
from torch import Tensor

from tensorpress import _cuda_kernels as cuda_kernels
from tensorpress._eager import PLAIN_TENSOR_TYPES, plain_eager, recording, transforming
from tensorpress._ext import _C
from tensorpress.ops import tt_autotune
from tensorpress.ops.tt_dense import dense_from_halves
from tensorpress.ops.tt_plan import (
    Permutation,
    TTPlan,
    choose_plan,
    cuda_limits,
    cuda_schedule,
    flat_dims,
    plan_info,
    tensor_cores_for,
)
from tensorpress.ops.tt_prepare import (
    merge_group,
    merged_groups,  # noqa: F401 (merge_group: public here)
    prepared_grads,
    prepared_outputs,
    step_matrices_of_groups,
)
from tensorpress.tt_format import cores_to_dense

_KERNEL_DTYPES = (torch.float32, torch.float64)
SYMBOLIC_BATCH_HINT = 256
_SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------- validation
def validate_tt_cores(cores: Sequence[Tensor], name: str = "cores") -> None:
    """Raise a clear error unless `cores` form a TT-matrix chain on one device and dtype."""
    if not isinstance(cores, (list, tuple)) or len(cores) == 0:
        raise TypeError(f"{name}: expected a non-empty list of tensors, got {type(cores).__name__}")
    for k, g in enumerate(cores):
        if not isinstance(g, Tensor):
            raise TypeError(f"{name}[{k}]: expected a tensor, got {type(g).__name__}")
        if g.dim() != 4:
            raise ValueError(f"{name}[{k}]: expected a 4-d core (r_left, m, n, r_right), got shape {tuple(g.shape)}")
        if g.dtype != cores[0].dtype:
            raise TypeError(f"{name}[{k}]: expected dtype {cores[0].dtype} like {name}[0], got {g.dtype}")
        if g.device != cores[0].device:
            raise ValueError(f"{name}[{k}]: expected device {cores[0].device} like {name}[0], got {g.device}")
        if k > 0 and g.shape[0] != cores[k - 1].shape[3]:
            raise ValueError(
                f"{name}[{k}]: expected r_left = {cores[k - 1].shape[3]} (r_right of {name}[{k - 1}]), got {g.shape[0]}"
            )
    if cores[0].shape[0] != 1 or cores[-1].shape[3] != 1:
        raise ValueError(
            f"{name}: expected boundary ranks r_0 = r_d = 1, got {cores[0].shape[0]} and {cores[-1].shape[3]}"
        )
    if cores[0].dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"{name}: expected dtype float32, float64, float16 or bfloat16, got {cores[0].dtype}")


def _check_input(x: Tensor, cores: Sequence[Tensor]) -> int:
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected a tensor, got {type(x).__name__}")
    n = 1
    for g in cores:
        n *= g.shape[2]
    if x.dim() < 1 or x.shape[-1] != n:
        raise ValueError(f"x: expected last dimension {n} (= prod of the cores' n_k), got shape {tuple(x.shape)}")
    if x.dtype != cores[0].dtype:
        raise TypeError(f"x: expected dtype {cores[0].dtype} (the cores' dtype), got {x.dtype}")
    if x.device != cores[0].device:
        raise ValueError(f"x: expected device {cores[0].device} (the cores' device), got {x.device}")
    return n


# ----------------------------------------------------------------------------- plan helpers
def tt_to_dense(cores: Sequence[Tensor]) -> Tensor:
    """W (prod m_k, prod n_k) from TT-matrix cores."""
    validate_tt_cores(cores)
    return cores_to_dense(cores)


def step_matrices(merged: Sequence[Tensor], order: Sequence[int]) -> list[Tensor]:
    """Each absorbed core as the (K x N) matrix its step multiplies by (see csrc/tt/tt_plan.h)."""
    info = plan_info(tuple(flat_dims(tuple(g.shape) for g in merged)), tuple(order))
    return [merged[s.core].permute(*s.core_perm).reshape(s.K, s.N).contiguous() for s in info.steps]


# ----------------------------------------------------------------------------- custom ops
_scratch = threading.local()


def _workspace(x: Tensor, core_dims: list[int], order: list[int], backward: bool) -> tuple[Tensor, int]:
    """Scratch memory for the kernel and the thread count it is sized for.

    Kept per Python thread (so concurrent callers never share it) and grown on demand:
    a fresh multi-MB buffer per call costs page faults comparable to a small kernel call.
    """
    threads = torch.get_num_threads()
    size = _C.tt_workspace_size(core_dims, order, x.shape[0], threads, backward, x.element_size())
    buffers = _scratch.__dict__.setdefault("buffers", {})
    key = (x.dtype, x.device)
    buf = buffers.get(key)
    if buf is None or buf.numel() < size:
        buf = buffers[key] = torch.empty(size, dtype=x.dtype, device=x.device)
    return buf[:size], threads


# ----------------------------------------------------------------------------- CUDA plumbing
_cuda_tables: dict = {}


def _tables(core_dims: list[int], order: list[int], device: torch.device) -> Tensor:
    """The plan's gather tables on the device, built once per (plan, device)."""
    key = (tuple(core_dims), tuple(order), device)
    t = _cuda_tables.get(key)
    if t is None:
        t = _cuda_tables[key] = torch.tensor(_C.tt_cuda_tables(core_dims, order), dtype=torch.int32, device=device)
    return t


def cuda_kernel_path(
    core_dims: list[int],
    order: list[int],
    batch: int,
    dtype: torch.dtype,
    device,
    backward: bool = False,
    path: str = "auto",
    tensor_cores: bool | None = None,
) -> str:
    """The kernel a CUDA call runs: "decode" when asked for (forward only; a backward asked of
    it runs "tiled"), "fused" where a block of samples fits in shared memory (unless "tiled" is
    asked for), else "tiled". `tensor_cores` (None: as a call of `dtype` would, see
    `tensor_cores_for`) matters: the fused kernels then stage tiles in shared memory too."""
    tc = tensor_cores_for(dtype) if tensor_cores is None else bool(tensor_cores)
    return _cuda_sched(core_dims, order, batch, dtype, device, backward, path, tc).path


def _cuda_sched(core_dims, order, batch, dtype, device, backward, path, tensor_cores=False):
    merged = tuple(tuple(core_dims[i : i + 4]) for i in range(0, len(core_dims), 4))
    return cuda_schedule(merged, tuple(order), batch, backward, dtype, cuda_limits(device), path, tensor_cores)


def _run_cuda(x: Tensor, mats: list[Tensor], core_dims, order, path: str, bias: Tensor | None) -> Tensor:
    x = x.detach().contiguous()
    mats = [m.detach().contiguous() for m in mats]
    y = x.new_empty(x.shape[0], _out_features(core_dims))
    tc = tensor_cores_for(x.dtype)
    sched = _cuda_sched(core_dims, order, x.shape[0], x.dtype, x.device, False, path, tc)
    ws = torch.empty(max(sched.workspace, 1), dtype=mats[0].dtype, device=x.device)
    kernels = cuda_kernels.active()
    kernels.module.tt_forward(
        x,
        mats,
        core_dims,
        order,
        y,
        ws,
        1,
        tables=_tables(core_dims, order, x.device),
        path=path,
        stream=kernels.stream(x.device),
        tensor_cores=tc,
    )
    return y if bias is None else y.add_(bias)


def _run_cuda_backward(x, mats, core_dims, order, grad_out, need_x, need_mats, path, need_bias):
    x, grad_out = x.detach().contiguous(), grad_out.detach().contiguous()
    mats = [m.detach().contiguous() for m in mats]
    grad_x = torch.empty_like(x) if need_x else None
    grad_mats = [torch.empty_like(m) for m in mats] if need_mats else [None] * len(mats)
    tc = tensor_cores_for(x.dtype)
    sched = _cuda_sched(core_dims, order, x.shape[0], x.dtype, x.device, True, path, tc)
    ws = torch.empty(max(sched.workspace, 1), dtype=mats[0].dtype, device=x.device)
    kernels = cuda_kernels.active()
    kernels.module.tt_backward(
        x,
        mats,
        core_dims,
        order,
        grad_out,
        grad_x,
        grad_mats,
        ws,
        1,
        tables=_tables(core_dims, order, x.device),
        path=path,
        stream=kernels.stream(x.device),
        tensor_cores=tc,
    )
    grad_bias = grad_out.sum(0, dtype=mats[0].dtype) if need_bias else None
    return _backward_outputs(x, grad_x, grad_mats, grad_bias, need_x, need_mats)


def _uses_cuda_kernels(x: Tensor) -> bool:
    """x goes to our CUDA kernels (else CUDA tensors run the same plan through torch ops)."""
    kernels = cuda_kernels.active()
    return kernels.tt and kernels.takes(x)


@torch.library.custom_op("tensorpress::tt_contract", mutates_args=())
def tt_contract(
    x: Tensor,
    mats: list[Tensor],
    core_dims: list[int],
    order: list[int],
    path: str = "auto",
    bias: Tensor | None = None,
) -> Tensor:
    """y (B, M) = x (B, N) W^T (+ bias (M,)), executing a plan's steps with its step matrices
    (fused kernel; on the CPU the bias is added, and its gradient summed, block by block).

    On CUDA, x may be float16/bfloat16 with float32 mats; `path` picks the kernel ("auto",
    "fused", "tiled" or "decode"; the decode path is inference-only: the backward of a call
    made on it runs the tiled kernels; see `cuda_kernel_path`). On the CPU `path` is ignored.
    """
    if _uses_cuda_kernels(x):
        return _run_cuda(x, mats, core_dims, order, path, bias)
    if x.device.type != "cpu":
        y = tt_contract_torch(x, mats, core_dims, order)
        return y if bias is None else y.add_(bias)
    return _forward_cpu(x, mats, core_dims, order, bias)


def _forward_cpu(
    x: Tensor, mats: list[Tensor], core_dims: list[int], order: list[int], bias: Tensor | None = None
) -> Tensor:
    x = x.detach().contiguous()  # DLPack refuses tensors that require grad
    mats = [m.detach().contiguous() for m in mats]
    y = x.new_empty(x.shape[0], _out_features(core_dims))
    ws, threads = _workspace(x, core_dims, order, backward=False)
    _C.tt_forward(x, mats, core_dims, order, y, ws, threads, bias=None if bias is None else bias.detach().contiguous())
    return y


def _out_features(core_dims: list[int]) -> int:
    m = 1
    for k in range(1, len(core_dims), 4):
        m *= core_dims[k]
    return m


def _in_features(core_dims: list[int]) -> int:
    n = 1
    for k in range(2, len(core_dims), 4):
        n *= core_dims[k]
    return n


@tt_contract.register_fake
def _tt_contract_fake(x, mats, core_dims, order, path="auto", bias=None):
    torch._check(x.dim() == 2, lambda: f"x should be a 2d tensor (batch, N), got {x.dim()}D")
    torch._check(
        x.shape[1] == _in_features(core_dims),
        lambda: f"x should have {_in_features(core_dims)} columns, got {x.shape[1]}",
    )
    steps = plan_info(tuple(core_dims), tuple(order)).steps
    torch._check(len(mats) == len(steps), lambda: f"expected {len(steps)} step matrices, got {len(mats)}")
    for t, (m, s) in enumerate(zip(mats, steps)):
        torch._check(
            tuple(m.shape) == (s.K, s.N),
            lambda t=t, s=s, m=m: f"mats[{t}] should have shape ({s['K']}, {s['N']}), got {tuple(m.shape)}",
        )
        torch._check(
            m.dtype == compute_dtype(x.dtype),
            lambda t=t, m=m: f"mats[{t}] should have dtype {compute_dtype(x.dtype)}, got {m.dtype}",
        )
    if bias is not None:
        torch._check(
            tuple(bias.shape) == (_out_features(core_dims),),
            lambda: f"bias should have shape ({_out_features(core_dims)},), got {tuple(bias.shape)}",
        )
    return x.new_empty(x.shape[0], _out_features(core_dims))


@torch.library.custom_op("tensorpress::tt_contract_backward", mutates_args=())
def tt_contract_backward(
    x: Tensor,
    mats: list[Tensor],
    core_dims: list[int],
    order: list[int],
    grad_out: Tensor,
    need_x: bool,
    need_mats: bool,
    path: str = "auto",
    need_bias: bool = False,
) -> list[Tensor]:
    """[grad_x, grad_mats..., grad_bias]; gradients that are not needed come back as empty
    tensors.

    The forward states are recomputed per block of samples from x; nothing but x and the
    (batch-independent) step matrices is kept between forward and backward.
    """
    if _uses_cuda_kernels(x):
        return _run_cuda_backward(x, mats, core_dims, order, grad_out, need_x, need_mats, path, need_bias)
    if x.device.type != "cpu":
        return _tt_contract_backward_torch(x, mats, core_dims, order, grad_out, need_x, need_mats, need_bias)
    return _backward_cpu(x, mats, core_dims, order, grad_out, need_x, need_mats, need_bias)


def _backward_cpu(x, mats, core_dims, order, grad_out, need_x, need_mats, need_bias) -> list[Tensor]:
    x, grad_out = x.detach().contiguous(), grad_out.detach().contiguous()
    mats = [m.detach().contiguous() for m in mats]
    grad_x = torch.empty_like(x) if need_x else None
    grad_mats = [torch.empty_like(m) for m in mats] if need_mats else [None] * len(mats)
    grad_bias = x.new_empty(_out_features(core_dims)) if need_bias else None
    ws, threads = _workspace(x, core_dims, order, backward=True)
    _C.tt_backward(x, mats, core_dims, order, grad_out, grad_x, grad_mats, ws, threads, grad_bias=grad_bias)
    return _backward_outputs(x, grad_x, grad_mats, grad_bias, need_x, need_mats)


def _backward_outputs(x, grad_x, grad_mats, grad_bias, need_x, need_mats) -> list[Tensor]:
    # gradients not asked for come back as distinct empty tensors (outputs may not alias)
    return (
        [grad_x if need_x else x.new_empty(0)]
        + [g if need_mats else x.new_empty(0) for g in grad_mats]
        + [x.new_empty(0) if grad_bias is None else grad_bias]
    )


@tt_contract_backward.register_fake
def _tt_contract_backward_fake(x, mats, core_dims, order, grad_out, need_x, need_mats, path="auto", need_bias=False):
    return (
        [torch.empty_like(x) if need_x else x.new_empty(0)]
        + [torch.empty_like(m) if need_mats else x.new_empty(0) for m in mats]
        + [x.new_empty(_out_features(core_dims)) if need_bias else x.new_empty(0)]
    )


def _tt_contract_backward_setup(ctx, inputs, output):
    x, mats, core_dims, order, grad_out, need_x, need_mats = inputs[:7]
    ctx.save_for_backward(x, grad_out, *mats)
    ctx.core_dims, ctx.order, ctx.need_x, ctx.need_mats = core_dims, order, need_x, need_mats
    ctx.need_bias = len(inputs) > 8 and inputs[8]


def _tt_contract_backward_grad(ctx, grads_of_outputs):
    """The backward's own vector-Jacobian product (second-order gradients: gradient penalties,
    Hessian-vector products), through the torch reference of the same plan."""
    x, grad_out, *mats = ctx.saved_tensors
    with torch.enable_grad():
        xd, god = x.detach().requires_grad_(), grad_out.detach().requires_grad_()
        md = [m.detach().requires_grad_() for m in mats]
        outs = _tt_contract_backward_torch(
            xd, md, ctx.core_dims, ctx.order, god, ctx.need_x, ctx.need_mats, ctx.need_bias, create_graph=True
        )
        pairs = [(o, g) for o, g in zip(outs, grads_of_outputs) if o.numel() and o.requires_grad]
        wrt = [xd, *md, god]
        got: Sequence[Tensor | None] = (
            torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True)
            if pairs
            else [None] * len(wrt)
        )
    full = [torch.zeros_like(t) if g is None else g for g, t in zip(got, wrt)]
    # one entry per input of the call: x, mats, core_dims, order, grad_out, need_x, need_mats[, path[, need_bias]]
    # (the dispatcher drops trailing arguments equal to their defaults: count what autograd saw)
    return (full[0], full[1:-1], None, None, full[-1], *[None] * (len(ctx.needs_input_grad) - 5))


tt_contract_backward.register_autograd(_tt_contract_backward_grad, setup_context=_tt_contract_backward_setup)


def _tt_contract_setup(ctx, inputs, output):
    x, mats, core_dims, order = inputs[:4]
    # defaults not passed are not in `inputs`
    path = inputs[4] if len(inputs) > 4 else "auto"
    ctx.has_bias = len(inputs) > 5 and inputs[5] is not None
    ctx.save_for_backward(x, *mats)
    ctx.core_dims, ctx.order = core_dims, order
    # the backward needs more shared memory than the forward: a forced "fused" may not fit it
    ctx.path = "auto" if path == "fused" else path


def _tt_contract_grad(ctx, grad_out):
    x, *mats = ctx.saved_tensors
    need_x = bool(ctx.needs_input_grad[0])
    need_mats = any(ctx.needs_input_grad[1])  # one flag per step matrix
    need_bias = ctx.has_bias and bool(ctx.needs_input_grad[5])
    grads = tt_contract_backward(x, mats, ctx.core_dims, ctx.order, grad_out, need_x, need_mats, ctx.path, need_bias)
    grad_x = grads[0] if need_x else None
    # one entry per step matrix, even when none of them needs a gradient (frozen cores)
    grad_mats = list(grads[1:-1]) if need_mats else [None] * len(mats)
    # one entry per argument actually passed (a defaulted `path` or `bias` is not among them)
    rest = [None] * (len(ctx.needs_input_grad) - 2)
    if need_bias:
        rest[-1] = grads[-1]
    return (grad_x, grad_mats, *rest)


tt_contract.register_autograd(_tt_contract_grad, setup_context=_tt_contract_setup)


# ----------------------------------------------------------------------------- torch references
def tt_contract_torch(x: Tensor, mats: list[Tensor], core_dims: list[int], order: list[int]) -> Tensor:
    """The same plan executed with torch ops (reference for the kernel; GPU fallback)."""
    info = plan_info(tuple(core_dims), tuple(order))
    batch = x.shape[0]
    state = x
    for mat, s in zip(mats, info.steps):
        state = _permute_samples(state, s.before, batch)
        state = state.reshape(batch * s.rows, s.K) @ mat
    return _permute_samples(state, info.final, batch).reshape(batch, info.out_features)


def _permute_samples(state: Tensor, p: Permutation, batch: int) -> Tensor:
    if p.identity:
        return state
    moved = state.reshape(batch, *p.dims).permute(0, *[1 + i for i in p.perm])
    return moved.reshape(batch, math.prod(p.dims))


def _tt_contract_backward_torch(
    x, mats, core_dims, order, grad_out, need_x, need_mats, need_bias=False, create_graph=False
):
    """The backward by torch ops; with create_graph, differentiable in x, mats and grad_out."""
    grad_x: Tensor | None = None
    grad_mats: list[Tensor | None] = [None] * len(mats)
    if need_x or need_mats:
        with torch.enable_grad():
            xd = x if create_graph else x.detach().requires_grad_(need_x)
            md = mats if create_graph else [m.detach().requires_grad_(need_mats) for m in mats]
            y = tt_contract_torch(xd, md, core_dims, order)
            wrt = ([xd] if need_x else []) + (md if need_mats else [])
            grads = list(torch.autograd.grad(y, wrt, grad_out, create_graph=create_graph))
        grad_x = grads.pop(0) if need_x else None
        grad_mats = list(grads) if need_mats else grad_mats
    grad_bias = grad_out.sum(0, dtype=mats[0].dtype) if need_bias else None
    return _backward_outputs(x, grad_x, grad_mats, grad_bias, need_x, need_mats)


def tt_matmul_reference(x: Tensor, cores: Sequence[Tensor]) -> Tensor:
    """x W^T by a core-by-core einsum sweep, no merging: the plain reference (use float64)."""
    validate_tt_cores(cores)
    _check_input(x, cores)
    lead = x.shape[:-1]
    # state: (B, m_<k, r_{k-1}, n_k, n_>k), absorbing cores left to right
    state = x.reshape(math.prod(lead), 1, 1, x.shape[-1])
    for g in cores:
        rl, m, n, rr = g.shape
        b, mo, _, rest = state.shape
        state = state.reshape(b, mo, rl, n, rest // n)
        state = torch.einsum("bpanq,amnr->bpmrq", state, g).reshape(b, mo * m, rr, rest // n)
    return state.reshape(*lead, state.shape[1])


# ----------------------------------------------------------------------------- public entry
def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernel computes in: the half types accumulate in float32."""
    return dtype if dtype in _KERNEL_DTYPES else torch.float32


def _compute_cores(cores: Sequence[Tensor]) -> list[Tensor]:
    compute = compute_dtype(cores[0].dtype)
    return [g.to(compute) for g in cores]


def prepare_tt(cores: Sequence[Tensor], plan: TTPlan) -> list[Tensor]:
    """The batch-independent part of a call: merged cores laid out as the plan's step
    matrices (or, for the dense route, the single matrix W^T). Differentiable in the cores
    (one autograd node, `ops/tt_prepare.py`)."""
    cores_c = _compute_cores(cores)
    if plan.dense:
        return [tt_to_dense(cores_c).T]
    return list(step_matrices_of_groups(cores_c, plan.groups, _step_layouts(plan)))


def _step_layouts(plan: TTPlan) -> tuple:
    """Per step of a fused plan: (merged group, permutation, K, N) of its step matrix."""
    info = plan_info(tuple(flat_dims(plan.merged_shapes)), tuple(plan.order))
    return tuple((s.core, s.core_perm, s.K, s.N) for s in info.steps)


def apply_tt(x: Tensor, mats: list[Tensor], plan: TTPlan, bias: Tensor | None = None) -> Tensor:
    """x (B, N) contracted with prepared matrices (+ bias): in the compute dtype, or on CUDA
    also in float16/bfloat16 (the kernels read the half types and accumulate in float32; the
    dense route multiplies in x's dtype, on the tensor cores). `bias` is in the compute dtype."""
    if plan.dense:
        w_t = mats[0].to(x.dtype)
        return x @ w_t if bias is None else torch.addmm(bias.to(x.dtype), x, w_t)
    core_dims, order = flat_dims(plan.merged_shapes), list(plan.order)
    if _eager_cpu_inference(x, mats, bias):
        # what the custom op would run, without its dispatch (a third of a small call's time)
        return _forward_cpu(x, mats, core_dims, order, bias)
    path = plan.path if plan.path in ("fused", "tiled", "decode") else "auto"
    if _eager_cuda_inference(x, mats, bias):  # the same, on CUDA: one extension call, no dispatch
        return _run_cuda(x, mats, core_dims, order, path, bias)
    return tt_contract(x, mats, core_dims, order, path, bias)


class _EagerCpuTraining(torch.autograd.Function):
    """prepare_tt + the custom op's CPU kernels as one autograd node, for eager training on
    the CPU: the same kernels and the same saved tensors (x, the cores, the small step
    matrices), without the custom op's dispatch and two extra nodes (~4% of a 1024^2 rank-8
    batch-256 step). Under torch.compile and on other devices the custom op runs instead."""

    @staticmethod
    def forward(ctx, plan: TTPlan, steps, x: Tensor, bias: Tensor | None, *cores: Tensor) -> Tensor:
        mats = prepared_outputs(cores, plan.groups, steps)
        core_dims, order = flat_dims(plan.merged_shapes), list(plan.order)
        ctx.plan, ctx.steps, ctx.bias_given = plan, steps, bias is not None
        ctx.save_for_backward(x, *cores, *mats)
        return _forward_cpu(x, list(mats), core_dims, order, bias)

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        plan = ctx.plan
        n_cores = sum(len(g) for g in plan.groups)
        x, *rest = ctx.saved_tensors
        cores, mats = rest[:n_cores], rest[n_cores:]
        need_x, need_bias = ctx.needs_input_grad[2], ctx.needs_input_grad[3]
        need_cores = any(ctx.needs_input_grad[4:])
        if torch.is_grad_enabled():
            # create_graph=True (a gradient penalty, a Hessian-vector product): the kernel's
            # gradients carry no graph, so the gradient is rebuilt from differentiable torch ops
            return (
                None,
                None,
                *_differentiable_vjp(plan, ctx.steps, x, ctx.bias_given, cores, grad_y, ctx.needs_input_grad[2:]),
            )
        grads = _backward_cpu(
            x, mats, flat_dims(plan.merged_shapes), list(plan.order), grad_y, need_x, need_cores, need_bias
        )
        core_grads = prepared_grads(cores, plan.groups, ctx.steps, grads[1:-1]) if need_cores else [None] * n_cores
        return (None, None, grads[0] if need_x else None, grads[-1] if need_bias else None, *core_grads)


def _differentiable_vjp(
    plan: TTPlan, steps, x: Tensor, bias_given: bool, cores: Sequence[Tensor], grad_y: Tensor, needs: Sequence[bool]
) -> list[Tensor | None]:
    """[grad x, grad bias, grad cores...] of y = x W^T + b by torch ops that autograd can
    differentiate again (in x, the cores and grad_y)."""
    with torch.enable_grad():
        mats = step_matrices_of_groups(cores, plan.groups, steps)  # twice differentiable
        y = tt_contract_torch(x, list(mats), flat_dims(plan.merged_shapes), list(plan.order))
        wrt = [t for t, need in zip((x, *cores), (needs[0], *needs[2:])) if need]
        grads = list(torch.autograd.grad(y, wrt, grad_y, create_graph=True, allow_unused=True)) if wrt else []
    out = [grads.pop(0) if needs[0] else None, grad_y.sum(0) if bias_given and needs[1] else None]
    for k, core in enumerate(cores):
        g = grads.pop(0) if needs[2 + k] else None
        out.append(torch.zeros_like(core) if needs[2 + k] and g is None else g)
    if needs[0] and out[0] is None:
        out[0] = torch.zeros_like(x)
    return out


def _eager_cpu_training(x: Tensor, cores: Sequence[Tensor], bias: Tensor | None) -> bool:
    """Autograd on, a kernel dtype, and `plain_eager` (nothing records the call; plain CPU
    tensors, not fake or subclassed)."""
    return (
        x.dtype in _KERNEL_DTYPES
        and plain_eager(x, *cores, bias)
        and not _uses_cuda_kernels(x)
        and torch.is_grad_enabled()
        and any(t is not None and t.requires_grad for t in (x, *cores, bias))
    )


def _eager_cpu_inference(x: Tensor, mats: list[Tensor], bias: Tensor | None = None) -> bool:
    """No autograd, a kernel dtype, and `plain_eager`: the custom op adds nothing to the kernel."""
    return (
        x.dtype in _KERNEL_DTYPES
        and plain_eager(x, *mats, bias)
        and not _uses_cuda_kernels(x)
        and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *mats, bias)))
    )


def _eager_cuda_inference(x: Tensor, mats: list[Tensor], bias: Tensor | None = None) -> bool:
    """No autograd, nothing records the call, plain tensors where our CUDA kernels run: the
    custom op's dispatch would only add host time (CUDA graph capture is fine: the same launch)."""
    tensors = (x, *mats, bias)
    return (
        _uses_cuda_kernels(x)
        and not recording()
        and all(t is None or type(t) in PLAIN_TENSOR_TYPES for t in tensors)
        and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))
    )


def _dense_route(x: Tensor, cores: Sequence[Tensor]) -> Tensor:
    """The dense plan when W is rebuilt at this call: the two halves of the chain merged
    (small, batch-independent), then `dense_from_halves` (one GEMM; a lean backward)."""
    cores_c = _compute_cores(cores)
    half = len(cores_c) // 2
    left, right = merged_groups(cores_c, (tuple(range(half)), tuple(range(half, len(cores_c)))))
    return dense_from_halves(x, left.to(x.dtype), right.to(x.dtype))


def select_plan(
    shapes,
    batch: int,
    allow_dense: bool = True,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    training: bool = False,
) -> TTPlan:
    """The plan a call runs: `choose_plan`'s (the cost model), or on the CPU with the opt-in
    autotune (`set_autotune`) the fastest of the model's few best, timed once (never while
    anything records the computation)."""
    if tt_autotune.autotune_enabled() and str(device) == "cpu" and not recording():
        shapes = tuple(tuple(int(v) for v in s) for s in shapes)
        return tt_autotune.autotuned_plan(
            shapes, int(batch), bool(allow_dense), compute_dtype(dtype), bool(training), _run_plan
        )
    return choose_plan(shapes, batch, allow_dense=allow_dense, device=device, dtype=dtype, training=training)


def _run_plan(x: Tensor, cores: list[Tensor], plan: TTPlan, training: bool) -> None:
    """One call on `plan`, as the autotune times it: forward (+ backward in training)."""
    if training:
        cores = [g.detach().requires_grad_(True) for g in cores]
        x = x.detach().requires_grad_(True)
        y = tt_matmul(x, cores, plan)
        torch.autograd.grad(y, [x, *cores], torch.ones_like(y))
    else:
        with torch.no_grad():
            apply_tt(x, prepare_tt(cores, plan), plan)


def plan_for(cores: Sequence[Tensor], batch) -> TTPlan:
    shapes = [tuple(g.shape) for g in cores]
    # (CPU tensors of the CUDA emulation build, tests only, are planned as CUDA tensors)
    device = "cuda" if _uses_cuda_kernels(cores[0]) else cores[0].device.type
    dtype = cores[0].dtype
    if torch.compiler.is_compiling():
        # Under torch.compile the batch may be symbolic and one graph may serve every batch
        # size: take the fused plan that is best at a typical batch (never the dense route).
        return choose_plan(shapes, SYMBOLIC_BATCH_HINT, allow_dense=False, device=device, dtype=dtype)
    training = torch.is_grad_enabled() and any(g.requires_grad for g in cores)
    return select_plan(shapes, batch, device=device, dtype=dtype, training=training)


def tt_matmul(
    x: Tensor,
    cores: Sequence[Tensor],
    plan: TTPlan | None = None,
    prepared: list[Tensor] | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    """y = x W^T (+ bias) with W given by TT-matrix cores, through the fused kernel.

    Args:
        x: (..., N) with N = prod n_k; float32, float64, float16 or bfloat16 (the half types
           are computed in float32 and cast back).
        cores: d tensors (r_{k-1}, m_k, n_k, r_k) of x's dtype and device, r_0 = r_d = 1.
        plan: from `select_plan(shapes, batch, device=...)`; chosen by the cost model of x's
           device (or the opt-in autotune) when omitted (on CUDA: fused, tiled or dense, see
           `choose_cuda_plan`).
        prepared: `prepare_tt(cores, plan)`, when the caller keeps it between calls.
        bias: (M,) of the cores' dtype and device, or None; added inside the kernel on the CPU.
    Returns:
        (..., M) with M = prod m_k. Differentiable in x, in every core and in the bias.
    """
    validate_tt_cores(cores)
    n = _check_input(x, cores)
    if bias is not None:
        _check_bias(bias, cores)
    lead = x.shape[:-1]
    x2 = x.reshape(math.prod(lead), n)  # not -1: that is ambiguous for an empty batch
    if plan is None:
        plan = plan_for(cores, x2.shape[0])
    # the CUDA kernels and cuBLAS take the half types as they are; the CPU computes in float32
    x_in = x2 if _uses_cuda_kernels(x2) and not transforming() else x2.to(compute_dtype(x.dtype))
    bias_c = None if bias is None else bias.to(compute_dtype(bias.dtype))
    if transforming():
        y = _tt_matmul_torch(x_in, cores, plan, prepared, bias_c)
    elif prepared is None and plan.dense and len(cores) > 1:
        y = _dense_route(x_in, cores)
        y = y if bias_c is None else y + bias_c.to(y.dtype)
    elif prepared is None and not plan.dense and _eager_cpu_training(x_in, cores, bias_c):
        cores_c = _compute_cores(cores)
        y = _EagerCpuTraining.apply(plan, _step_layouts(plan), x_in, bias_c, *cores_c)
    else:
        y = apply_tt(x_in, prepare_tt(cores, plan) if prepared is None else prepared, plan, bias_c)
    y = y.to(x.dtype)
    return y if x.dim() == 2 else y.reshape(*lead, y.shape[1])  # (no view node where none is needed)


def _tt_matmul_torch(
    x: Tensor, cores: Sequence[Tensor], plan: TTPlan, prepared: list[Tensor] | None, bias: Tensor | None
) -> Tensor:
    """The plan by plain differentiable torch ops (merges, permutes, matmuls): under torch.func
    and forward-mode AD, where autograd Functions and the custom op have no batching or
    forward-mode rules and torch's ops have them all."""
    cores_c = _compute_cores(cores)
    if prepared is not None:
        mats = prepared
    elif plan.dense:
        mats = [tt_to_dense(cores_c).T]
    else:
        merged = [merge_group(cores_c, g) for g in plan.groups]
        mats = [merged[i].permute(*perm).reshape(K, N) for i, perm, K, N in _step_layouts(plan)]
    if plan.dense:
        y = x @ mats[0]
    else:
        y = tt_contract_torch(x, list(mats), flat_dims(plan.merged_shapes), list(plan.order))
    return y if bias is None else y + bias


def _check_bias(bias: Tensor, cores: Sequence[Tensor]) -> None:
    m = math.prod([g.shape[1] for g in cores])  # a list: dynamo cannot trace a generator here
    if not isinstance(bias, Tensor):
        raise TypeError(f"bias: expected a tensor or None, got {type(bias).__name__}")
    if tuple(bias.shape) != (m,):
        raise ValueError(f"bias: expected shape ({m},) (= prod of the cores' m_k), got {tuple(bias.shape)}")
    if bias.dtype != cores[0].dtype:
        raise TypeError(f"bias: expected dtype {cores[0].dtype} (the cores' dtype), got {bias.dtype}")
    if bias.device != cores[0].device:
        raise ValueError(f"bias: expected device {cores[0].device} (the cores' device), got {bias.device}")
