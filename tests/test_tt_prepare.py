"""ops/tt_prepare.py: merged groups and step matrices as one autograd node, against the
autograd of plain torch ops."""

from __future__ import annotations

import pytest
import torch

from _util import random_cores
from tensorpress.ops.tt import merge_group, step_matrices
from tensorpress.ops.tt_plan import _orders, _partitions, flat_dims, plan_info
from tensorpress.ops.tt_prepare import merged_groups, step_matrices_of_groups

CHAINS = [((2, 3), (3, 2), (2,)), ((2, 3, 2), (3, 1, 2), (3, 2)), ((2, 2, 3, 2), (2, 3, 2, 2), (2, 3, 1))]


def steps_of(cores, groups, order):
    merged_shapes = [tuple(t.shape) for t in (merge_group(cores, g) for g in groups)]
    info = plan_info(tuple(flat_dims(merged_shapes)), tuple(order))
    return [(s.core, s.core_perm, s.K, s.N) for s in info.steps]


def every_plan(d):
    for groups in _partitions(d):
        for order in _orders(len(groups)):
            yield groups, order


@pytest.mark.parametrize("m, n, ranks", CHAINS)
def test_step_matrices_and_their_gradients_match_torch_autograd(m, n, ranks):
    gen = torch.Generator().manual_seed(0)
    for groups, order in every_plan(len(m)):
        cores = [g.requires_grad_() for g in random_cores(m, n, ranks, generator=gen)]
        ref = step_matrices([merge_group(cores, g) for g in groups], order)
        ours = step_matrices_of_groups(cores, groups, steps_of(cores, groups, order))
        assert len(ours) == len(ref)
        weights = [torch.randn(r.shape, generator=gen, dtype=r.dtype) for r in ref]
        ref_grads = torch.autograd.grad(sum((r * w).sum() for r, w in zip(ref, weights)), cores)
        our_grads = torch.autograd.grad(sum((o * w).sum() for o, w in zip(ours, weights)), cores)
        for r, o in zip(ref, ours):
            torch.testing.assert_close(o, r, rtol=1e-12, atol=1e-12)
        for r, o in zip(ref_grads, our_grads):
            torch.testing.assert_close(o, r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("m, n, ranks", CHAINS)
def test_gradcheck_and_gradgradcheck(m, n, ranks):
    gen = torch.Generator().manual_seed(1)
    d = len(m)
    cores = tuple(g.requires_grad_() for g in random_cores(m, n, ranks, generator=gen))
    groups, order = ((tuple(range(d)),), (0,)) if d < 3 else (((0, 1), tuple(range(2, d))), (1, 0))
    steps = steps_of(cores, groups, order)
    halves = ((0,), tuple(range(1, d)))
    for fn in (lambda *c: step_matrices_of_groups(c, groups, steps), lambda *c: merged_groups(c, halves)):
        assert torch.autograd.gradcheck(fn, cores)
        assert torch.autograd.gradgradcheck(fn, cores)


def test_core_gradients_are_row_major_and_outputs_never_alias_the_cores():
    """A lone core laid out as it lies must come back as a copy; gradients that came through
    permutes must be copied to exact row-major strides (size-1 dims included: DDP checks)."""
    gen = torch.Generator().manual_seed(2)
    cores = [g.requires_grad_() for g in random_cores((1, 3), (4, 1), (2,), generator=gen)]
    halves = merged_groups(cores, ((0,), (1,)))
    for h, c in zip(halves, cores):
        assert h.data_ptr() != c.data_ptr() and torch.equal(h, c)
    steps = steps_of(cores, ((0,), (1,)), (0, 1))
    mats = step_matrices_of_groups(cores, ((0,), (1,)), steps)
    grads = torch.autograd.grad(sum(m.sum() for m in mats), cores)
    for g, c in zip(grads, cores):
        assert g.shape == c.shape
        assert g.stride() == torch.empty(c.shape, device="meta").stride()
