"""Kernels as torch.library custom ops, each with a fake impl, autograd and a PyTorch reference."""

from tensorpress.ops.tt import select_plan, tt_matmul, tt_matmul_reference, tt_to_dense, validate_tt_cores
from tensorpress.ops.tt_autotune import autotune_enabled, set_autotune
from tensorpress.ops.tt_plan import TTPlan, choose_plan

__all__ = [
    "tt_matmul",
    "tt_matmul_reference",
    "tt_to_dense",
    "validate_tt_cores",
    "TTPlan",
    "choose_plan",
    "select_plan",
    "set_autotune",
    "autotune_enabled",
]
