"""Kernels as torch.library custom ops, each with a fake impl, autograd and a PyTorch reference."""
from tensorpress.ops.tt import tt_matmul, tt_matmul_reference, tt_to_dense, validate_tt_cores
from tensorpress.ops.tt_plan import TTPlan, autotune_enabled, choose_plan, set_autotune

__all__ = ["tt_matmul", "tt_matmul_reference", "tt_to_dense", "validate_tt_cores", "TTPlan", "choose_plan", "set_autotune",
           "autotune_enabled"]
