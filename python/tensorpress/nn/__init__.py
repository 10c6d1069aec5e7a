"""Drop-in compressed layers."""
from tensorpress.nn.factorize import balanced_factors
from tensorpress.nn.tt_linear import TTLinear

__all__ = ["TTLinear", "balanced_factors"]
