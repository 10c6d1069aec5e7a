"""Every way tt_matmul can execute a plan gives the same result: the CPU kernel called
directly (no autograd), the eager training node, the custom op (step matrices prepared by the
caller; what torch.compile runs), the plan as torch ops (torch.func, forward-mode AD), torch
.compile itself, and the core-by-core einsum reference, on every plan of a 3-core chain, in
float64, forward and gradients."""

from __future__ import annotations

import pytest
import torch

from _util import random_cores, rel_err
from tensorpress.ops import tt as T
from tensorpress.ops.tt_plan import ranked_plans

OUT, IN, RANKS = (2, 3, 2), (3, 2, 4), (3, 2)
SHAPES = tuple((r0, m, n, r1) for r0, m, n, r1 in zip((1, *RANKS), OUT, IN, (*RANKS, 1)))
PLANS = ranked_plans(SHAPES, 5, True, False)


def _inputs():
    gen = torch.Generator().manual_seed(0)
    cores = random_cores(OUT, IN, RANKS, dtype=torch.float64, generator=gen, requires_grad=True)
    x = torch.randn(5, 24, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(12, generator=gen, dtype=torch.float64, requires_grad=True)
    return x, cores, bias


def _kernel_no_grad(x, cores, bias, plan):
    with torch.no_grad():
        return T.tt_matmul(x, cores, plan=plan, bias=bias)


PATHS = {
    "eager": lambda x, cores, bias, plan: T.tt_matmul(x, cores, plan=plan, bias=bias),
    "custom_op": lambda x, cores, bias, plan: T.tt_matmul(
        x, cores, plan=plan, bias=bias, prepared=T.prepare_tt(cores, plan)
    ),
    "torch_ops": lambda x, cores, bias, plan: T._tt_matmul_torch(x, cores, plan, None, bias),
    "compiled": lambda x, cores, bias, plan: torch.compile(
        lambda x, *c: T.tt_matmul(x, list(c), plan=plan, bias=bias), backend="aot_eager", dynamic=False
    )(x, *cores),
}


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("plan_index", range(len(PLANS)))
def test_every_path_gives_the_reference(plan_index, path):
    plan = PLANS[plan_index]
    x, cores, bias = _inputs()
    ref = T.tt_matmul_reference(x, cores) + bias
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, *cores, bias])
    torch._dynamo.reset()
    y = PATHS[path](x, cores, bias, plan)
    assert rel_err(y, ref) < 1e-12
    grads = torch.autograd.grad(y.square().sum(), [x, *cores, bias])
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < 1e-12
    assert rel_err(_kernel_no_grad(x, cores, bias, plan), ref) < 1e-12


@pytest.mark.parametrize("extra", [(), ("auto",), ("auto", None)], ids=["defaults", "path", "path-bias"])
def test_custom_op_double_backward_with_defaulted_arguments(extra):
    """Second-order gradients through tensorpress::tt_contract called as users call it: the
    dispatcher drops trailing arguments equal to their defaults, and the backward's own
    backward must return one gradient per argument autograd saw (it returned 9 for 7)."""
    gen = torch.Generator().manual_seed(3)
    cores = random_cores((2, 3), (3, 2), (2,), generator=gen)
    plan = ranked_plans(tuple(tuple(g.shape) for g in cores), 4, False, False)[0]
    mats = [m.detach().requires_grad_() for m in T.prepare_tt(cores, plan)]
    x = torch.randn(4, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    dims, order = T.flat_dims(plan.merged_shapes), list(plan.order)
    y = torch.ops.tensorpress.tt_contract(x, mats, dims, order, *extra)
    grads = torch.autograd.grad(y.square().sum(), [x, *mats], create_graph=True)
    second = torch.autograd.grad(sum(g.square().sum() for g in grads), [x, *mats])
    # against the torch reference of the same plan
    ref_y = T.tt_contract_torch(x, mats, dims, order)
    ref_grads = torch.autograd.grad(ref_y.square().sum(), [x, *mats], create_graph=True)
    ref_second = torch.autograd.grad(sum(g.square().sum() for g in ref_grads), [x, *mats])
    for a, b in zip(second, ref_second):
        assert rel_err(a, b) < 1e-10
