"""The dense route of a TT-matrix layer: rebuild W from its two merged halves, one GEMM.

W[(a, c), (b, d)] = sum_r L[a, b, r] R[r, c, d], with L the first half of the cores merged
(1, mL, nL, r) and R the second half (r, mR, nR, 1). Through autograd's einsum chain the
backward of that rebuild copies the M x N weight gradient through several permuted layouts;
here it costs one GEMM for grad W, one permuted copy of it and two thin GEMMs (K = r) for
the halves. Only x and the halves are saved: W is rebuilt in the backward (a thin GEMM),
so the route keeps no weight-sized tensor alive between forward and backward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tensorpress.tt_format import cores_to_dense


def halves_to_dense(left: Tensor, right: Tensor) -> Tensor:
    """W (mL mR, nL nR) from the merged halves L (1, mL, nL, r) and R (r, mR, nR, 1)."""
    return cores_to_dense((left, right))


class _DenseFromHalves(torch.autograd.Function):
    """y = x W^T, W = halves_to_dense(left, right). The backward is built of differentiable
    torch ops, so the route stays twice differentiable."""

    # forward(ctx, ...) rather than setup_context: apply() then skips binding the arguments
    # through inspect.signature, which costs as much as a small layer's GEMM
    @staticmethod
    def forward(ctx, x: Tensor, left: Tensor, right: Tensor) -> Tensor:
        ctx.save_for_backward(x, left, right)
        return x @ halves_to_dense(left, right).T

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x, left, right = ctx.saved_tensors
        need_x, need_left, need_right = ctx.needs_input_grad
        grad_x = grad_left = grad_right = None
        if need_x:
            grad_x = grad_y @ halves_to_dense(left, right)
        if need_left or need_right:
            _, m_left, n_left, rank = left.shape
            _, m_right, n_right, _ = right.shape
            grad_w = grad_y.T @ x  # [(a, c), (b, d)]
            grad_pairs = (
                grad_w.reshape(m_left, m_right, n_left, n_right)
                .permute(0, 2, 1, 3)
                .reshape(m_left * n_left, m_right * n_right)
            )  # [(a, b), (c, d)]
            if need_left:
                grad_left = (grad_pairs @ right.reshape(rank, -1).T).reshape(left.shape)
            if need_right:
                grad_right = (left.reshape(-1, rank).T @ grad_pairs).reshape(right.shape)
        return grad_x, grad_left, grad_right


def dense_from_halves(x: Tensor, left: Tensor, right: Tensor) -> Tensor:
    """x (B, nL nR) times W^T for W = halves_to_dense(left, right); differentiable in all three."""
    return _DenseFromHalves.apply(x, left, right)
