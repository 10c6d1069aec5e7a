"""The bias of the fused TT contraction: added by the CPU kernel block by block, its gradient
summed there too (tt_matmul(..., bias=), tensorpress::tt_contract's `bias`)."""

from __future__ import annotations

import math

import pytest
import torch

import tensorpress  # noqa: F401  (registers the custom ops)
from _util import make_plan, random_cores, rel_err
from tensorpress.nn import TTLinear
from tensorpress.ops import choose_plan, tt_matmul, tt_matmul_reference
from tensorpress.ops.tt import merge_group, prepare_tt, step_matrices, tt_contract_torch
from tensorpress.ops.tt_plan import flat_dims

TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}
M_, N_, R_ = (3, 4, 5), (5, 2, 3), (4, 6)  # W is 60 x 30


def _problem(dtype, batch, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cores = random_cores(M_, N_, R_, generator=gen)
    bias = torch.randn(math.prod(M_), generator=gen, dtype=torch.float64)
    x = torch.randn(batch, math.prod(N_), generator=gen, dtype=torch.float64)
    grad_out = torch.randn(batch, math.prod(M_), generator=gen, dtype=torch.float64)
    cast = lambda t: t.to(dtype).requires_grad_(True)  # noqa: E731
    return cast(x), [cast(g) for g in cores], cast(bias), grad_out.to(dtype)


def _reference(x, cores, bias, grad_out):
    leaves = [t.detach().double().requires_grad_(True) for t in (x, *cores, bias)]
    y = tt_matmul_reference(leaves[0], leaves[1:-1]) + leaves[-1]
    return y.detach(), torch.autograd.grad(y, leaves, grad_out.double())


SHAPES = tuple(((1, *R_)[k], M_[k], N_[k], (*R_, 1)[k]) for k in range(3))
PLANS = {
    "core by core": make_plan(SHAPES, ((0,), (1,), (2,)), (1, 2, 0)),
    "merged pair": make_plan(SHAPES, ((0, 1), (2,)), (1, 0)),
    "dense": make_plan(SHAPES, None, None, dense=True),
    "auto": None,
}


@pytest.mark.parametrize("plan", PLANS.values(), ids=PLANS.keys())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 7, 700])  # 700: several blocks and both workers
def test_bias_forward_backward_match_float64_reference(plan, dtype, batch):
    x, cores, bias, grad_out = _problem(dtype, batch)
    before = [t.detach().clone() for t in (x, *cores, bias)]
    y = tt_matmul(x, cores, plan, bias=bias)
    grads = torch.autograd.grad(y, [x, *cores, bias], grad_out)
    y_ref, grads_ref = _reference(x, cores, bias, grad_out)
    tol = TOL[dtype] * (4 if dtype == torch.bfloat16 and batch == 700 else 1)  # long bf16 sums
    assert y.dtype == dtype and rel_err(y, y_ref) <= tol
    names = ["x"] + [f"cores[{k}]" for k in range(3)] + ["bias"]
    for name, g, g_ref in zip(names, grads, grads_ref):
        assert g.dtype == dtype and rel_err(g, g_ref) <= tol, name
    assert all(torch.equal(t.detach(), b) for t, b in zip((x, *cores, bias), before))


@pytest.mark.parametrize("plan", PLANS.values(), ids=PLANS.keys())
def test_bias_with_prepared_step_matrices_and_no_grad(plan):
    x, cores, bias, _ = _problem(torch.float64, 5)
    real = plan or choose_plan(SHAPES, 5)
    with torch.no_grad():
        y = tt_matmul(x, cores, real, prepared=prepare_tt(cores, real), bias=bias)
    y_ref, _ = _reference(x, cores, bias, torch.zeros(5, 60, dtype=torch.float64))
    assert rel_err(y, y_ref) <= 1e-12


@pytest.mark.parametrize("plan", [PLANS["merged pair"], PLANS["dense"]], ids=["fused", "dense"])
def test_gradcheck_with_bias(plan):
    x, cores, bias, _ = _problem(torch.float64, 3, seed=2)
    f = lambda x, b, *c: tt_matmul(x, list(c), plan, bias=b)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, bias, *cores), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_bias_gradient_alone_and_frozen_bias():
    x, cores, bias, grad_out = _problem(torch.float64, 9)
    _, grads_ref = _reference(x, cores, bias, grad_out)
    frozen = [g.detach() for g in cores]
    (gb,) = torch.autograd.grad(tt_matmul(x.detach(), frozen, PLANS["merged pair"], bias=bias), [bias], grad_out)
    assert rel_err(gb, grads_ref[-1]) <= 1e-12
    y = tt_matmul(x, cores, PLANS["merged pair"], bias=bias.detach())
    grads = torch.autograd.grad(y, [x, *cores], grad_out)
    for g, g_ref in zip(grads, grads_ref[:-1]):
        assert rel_err(g, g_ref) <= 1e-10


def test_bias_gradient_independent_of_thread_count():
    x, cores, bias, grad_out = _problem(torch.float64, 1000, seed=4)
    threads = torch.get_num_threads()
    results = []
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            y = tt_matmul(x, cores, PLANS["merged pair"], bias=bias)
            results.append(torch.autograd.grad(y, [bias], grad_out)[0])
    finally:
        torch.set_num_threads(threads)
    for r in results[1:]:
        assert rel_err(r, results[0]) <= 1e-13


def _op_args(dtype):
    gen = torch.Generator().manual_seed(6)
    cores = random_cores((3, 4), (2, 5), (3,), dtype=dtype, generator=gen)
    merged = [merge_group(cores, g) for g in ((0,), (1,))]
    mats = [m.requires_grad_(True) for m in step_matrices(merged, (1, 0))]
    dims = flat_dims([tuple(g.shape) for g in merged])
    x = torch.randn(4, 10, generator=gen, dtype=dtype, requires_grad=True)
    bias = torch.randn(12, generator=gen, dtype=dtype, requires_grad=True)
    return x, mats, dims, [1, 0], bias


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_opcheck_tt_contract_with_bias(dtype):
    x, mats, dims, order, bias = _op_args(dtype)
    torch.library.opcheck(torch.ops.tensorpress.tt_contract.default, (x, mats, dims, order, "auto", bias))
    grad_out = torch.randn(4, 12, dtype=dtype)
    args = (x.detach(), [m.detach() for m in mats], dims, order, grad_out, True, True, "auto", True)
    torch.library.opcheck(torch.ops.tensorpress.tt_contract_backward.default, args)
    *_, grad_bias = torch.ops.tensorpress.tt_contract_backward(*args)
    assert rel_err(grad_bias, grad_out.double().sum(0)) <= TOL[dtype]
    y = torch.ops.tensorpress.tt_contract(x, mats, dims, order, "auto", bias)
    assert (
        rel_err(y, tt_contract_torch(x.double(), [m.double() for m in mats], dims, order) + bias.double()) <= TOL[dtype]
    )


@pytest.mark.parametrize(
    "bad,kind,words",
    [
        (torch.zeros(59, dtype=torch.float64), ValueError, "bias: expected shape (60,)"),
        (torch.zeros(1, 60, dtype=torch.float64), ValueError, "bias: expected shape (60,)"),
        (torch.zeros(60, dtype=torch.float32), TypeError, "bias: expected dtype torch.float64"),
        (torch.zeros(60, dtype=torch.float64, device="meta"), ValueError, "bias: expected device cpu"),
        ([0.0] * 60, TypeError, "bias: expected a tensor or None"),
    ],
)
def test_bad_bias_is_refused_before_any_work(bad, kind, words):
    x, cores, _, _ = _problem(torch.float64, 3)
    with pytest.raises(kind, match=words.replace("(", r"\(").replace(")", r"\)")):
        tt_matmul(x, cores, bias=bad)


def test_kernel_refuses_bias_of_wrong_shape():
    x, mats, dims, order, bias = _op_args(torch.float64)
    x, mats = x.detach(), [m.detach() for m in mats]
    y = torch.empty(4, 12, dtype=torch.float64)
    ws = torch.empty(1 << 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="bias: expected shape"):
        tensorpress._C.tt_forward(x, mats, dims, order, y, ws, 1, bias=bias.detach()[:5])
    with pytest.raises(ValueError, match="grad_bias: expected shape"):
        tensorpress._C.tt_backward(
            x, mats, dims, order, y, None, [None, None], ws, 1, grad_bias=torch.empty(13, dtype=torch.float64)
        )


def _graph_nodes(fn) -> set[str]:
    seen, stack = set(), [fn]
    while stack:
        node = stack.pop()
        if node is None or type(node).__name__ in seen:
            continue
        seen.add(type(node).__name__)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return seen


def test_ttlinear_bias_gradient_through_the_kernel():
    """The layer hands its bias to the kernel: no separate add node, same values."""
    torch.manual_seed(7)
    layer = TTLinear(256, 256, 4, in_factors=(4, 8, 8), out_factors=(8, 8, 4), dtype=torch.float64)
    x = torch.randn(11, 256, dtype=torch.float64, requires_grad=True)
    assert not layer.plan(11).dense
    y = layer(x)
    nodes = _graph_nodes(y.grad_fn)
    assert not any(name.startswith("Add") for name in nodes), nodes
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *layer.cores, layer.bias], g)
    _, ref = _reference(x, list(layer.cores), layer.bias, g)
    for a, b in zip(grads, ref):
        assert rel_err(a, b) <= 1e-10
