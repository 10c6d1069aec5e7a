"""The batch-independent half of a TT layer's call as one autograd node: cores merged by
groups and, for the fused kernel, laid out as the plan's step matrices.

In training this runs at every call. Through autograd's generic ops it is some forty small
nodes forward and back, several times the kernel's own time for a small layer. Here the
merges run without autograd and the backward is written out. For M = merge(A, B)
(`merge_pair`), with dM laid out as (r0 m1 n1) x (m2 n2 r2):
    dA = dM B^T,   dB = A^T dM   (B as r1 x (m2 n2 r2), A as (r0 m1 n1) x r1).
A group merged left to right is differentiated right to left through its prefixes, which
the backward recomputes from the saved cores (small). The backward is built of
differentiable torch ops, so the node stays twice differentiable. Core gradients come back
with exact row-major strides (DDP's buckets want them; is_contiguous() ignores size-1 dims).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence

import torch
from torch import Tensor

from tensorpress.ops.tt_plan import CoreShape, merge_shapes
from tensorpress.tt_format import merge_pair

# A step of the fused kernel: which merged group it absorbs, how that core is permuted, and
# the (K, N) matrix it becomes (csrc/tt/tt_plan.h).
Step = tuple[int, tuple[int, ...], int, int]


def merge_pair_grads(a: Tensor, b: Tensor, grad: Tensor) -> tuple[Tensor, Tensor]:
    """The gradients of merge_pair(a, b) w.r.t. a and b, given the gradient of its output."""
    r0, m1, n1, r1 = a.shape
    _, m2, n2, r2 = b.shape
    g = grad.reshape(r0, m1, m2, n1, n2, r2).permute(0, 1, 3, 2, 4, 5).reshape(r0 * m1 * n1, m2 * n2 * r2)
    grad_a = (g @ b.reshape(r1, m2 * n2 * r2).T).view(a.shape)
    grad_b = (a.reshape(r0 * m1 * n1, r1).T @ g).view(b.shape)
    return grad_a, grad_b


def merge_group(cores: Sequence[Tensor], group: Sequence[int]) -> Tensor:
    """The cores of `group` merged left to right into one core."""
    return functools.reduce(merge_pair, (cores[k] for k in group))


def _prefixes(cores: Sequence[Tensor], group: Sequence[int]) -> list[Tensor]:
    """merge_group of every prefix of `group`, shortest first."""
    return list(itertools.accumulate((cores[k] for k in group), merge_pair))


def _row_major(t: Tensor) -> Tensor:
    strides, step = [], 1
    for size in reversed(t.shape):
        strides.append(step)
        step *= size
    if t.stride() == tuple(reversed(strides)):
        return t
    return torch.empty(t.shape, dtype=t.dtype, device=t.device).copy_(t)


def prepared_outputs(
    cores: Sequence[Tensor], groups: tuple[tuple[int, ...], ...], steps: tuple[Step, ...] | None
) -> tuple[Tensor, ...]:
    """The merged groups (steps None) or the step matrices, computed without autograd's
    bookkeeping; never sharing a core's memory (a lone core, laid out as it lies, is copied)."""
    merged = [merge_group(cores, g) for g in groups]
    if steps is None:
        outs = [(i, m) for i, m in enumerate(merged)]
    else:
        outs = [(i, merged[i].permute(*perm).reshape(K, N).contiguous()) for i, perm, K, N in steps]
    # a lone core laid out as it lies comes back as itself or a view of it; a merge or a
    # copying layout gives new memory. (No data_ptr: fake tensors under export have none.)
    return tuple(
        o.clone() if len(groups[i]) == 1 and (o is cores[groups[i][0]] or o._is_view()) else o for i, o in outs
    )


def prepared_grads(
    cores: Sequence[Tensor],
    groups: tuple[tuple[int, ...], ...],
    steps: tuple[Step, ...] | None,
    grads: Sequence[Tensor | None],
) -> list[Tensor | None]:
    """The cores' gradients from those of `prepared_outputs` (None where none flows)."""
    merged_grads: list[Tensor | None]
    if steps is None:
        merged_grads = list(grads)
    else:
        merged_grads = [None] * len(groups)
        shapes: tuple[CoreShape, ...] = tuple((c.shape[0], c.shape[1], c.shape[2], c.shape[3]) for c in cores)
        for (i, perm, _, _), grad in zip(steps, grads):
            if grad is None:
                continue
            merged, _ = merge_shapes(shapes, groups[i])
            laid_out = [merged[p] for p in perm]
            inverse = [perm.index(a) for a in range(4)]
            g = grad.reshape(laid_out).permute(*inverse)
            prev = merged_grads[i]
            merged_grads[i] = g if prev is None else prev + g
    core_grads: list[Tensor | None] = [None] * len(cores)
    for group, grad in zip(groups, merged_grads):
        if grad is None:
            continue
        # the prefixes the chain rule needs: all but the full merge itself
        prefixes = _prefixes(cores, group[:-1]) if len(group) > 1 else []
        for j in range(len(group) - 1, 0, -1):
            grad, core_grads[group[j]] = merge_pair_grads(prefixes[j - 1], cores[group[j]], grad)
        core_grads[group[0]] = grad
    return [None if g is None else _row_major(g) for g in core_grads]


class _Prepared(torch.autograd.Function):
    # forward(ctx, ...) rather than setup_context: apply() then skips binding the arguments
    # through inspect.signature, a good part of this node's cost at every call
    @staticmethod
    def forward(ctx, groups: tuple[tuple[int, ...], ...], steps: tuple[Step, ...] | None, *cores: Tensor):
        ctx.groups, ctx.steps = groups, steps
        ctx.save_for_backward(*cores)
        return prepared_outputs(cores, groups, steps)

    @staticmethod
    def backward(ctx, *grads):
        return (None, None, *prepared_grads(ctx.saved_tensors, ctx.groups, ctx.steps, grads))


def merged_groups(cores: Sequence[Tensor], groups: Sequence[Sequence[int]]) -> tuple[Tensor, ...]:
    """Each group of adjacent cores merged into one core (r_first, prod m, prod n, r_last)."""
    return _Prepared.apply(tuple(tuple(g) for g in groups), None, *cores)


def step_matrices_of_groups(
    cores: Sequence[Tensor], groups: Sequence[Sequence[int]], steps: Sequence[Step]
) -> tuple[Tensor, ...]:
    """The fused kernel's step matrices: merged group `i` permuted by `perm` into (K, N)."""
    return _Prepared.apply(tuple(tuple(g) for g in groups), tuple((i, tuple(p), K, N) for i, p, K, N in steps), *cores)
