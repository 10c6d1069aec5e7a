"""Drop-in compressed layers."""

from tensorpress.nn.cp_conv2d import CPConv2d
from tensorpress.nn.lowrank_linear import LowRankLinear
from tensorpress.nn.tt_linear import TTLinear
from tensorpress.nn.tucker_conv2d import TuckerConv2d
from tensorpress.tt_format import balanced_factors

__all__ = ["TTLinear", "LowRankLinear", "balanced_factors", "CPConv2d", "TuckerConv2d"]
