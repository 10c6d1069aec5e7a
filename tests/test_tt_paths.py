"""Every way tt_matmul can execute a plan gives the same result: the CPU kernel called
directly (no autograd), the eager training node, the custom op (step matrices prepared by the
caller; what torch.compile runs), the plan as torch ops (torch.func, forward-mode AD), torch
.compile itself, and the core-by-core einsum reference, on every plan of a 3-core chain, in
float64, forward and gradients."""
from __future__ import annotations

import pytest
import torch

from tensorpress.ops import tt as T
from tensorpress.ops.tt_plan import ranked_plans

from conftest import random_cores, rel_err

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
    "custom_op": lambda x, cores, bias, plan: T.tt_matmul(x, cores, plan=plan, bias=bias,
                                                          prepared=T.prepare_tt(cores, plan)),
    "torch_ops": lambda x, cores, bias, plan: T._tt_matmul_torch(x, cores, plan, None, bias),
    "compiled": lambda x, cores, bias, plan: torch.compile(
        lambda x, *c: T.tt_matmul(x, list(c), plan=plan, bias=bias), backend="aot_eager", dynamic=False)(x, *cores),
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
