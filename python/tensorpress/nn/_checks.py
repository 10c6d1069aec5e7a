"""Checks shared by the factorized layers (TTLinear, CPConv2d, TuckerConv2d, LowRankLinear)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

# the factors' dtypes: real floating types (complex factors would construct and then compute
# products nobody asked for; integer ones cannot hold gradients)
FACTOR_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_factor_dtype(dtype) -> None:
    """The ``dtype`` a layer is constructed with: None (torch's default) or a real float type."""
    if dtype is not None and dtype not in FACTOR_DTYPES:
        raise TypeError(f"dtype: expected float32, float64, float16 or bfloat16 (or None), got {dtype}")


def check_input_matches(x, params: Iterable[tuple[str, Tensor | None]]) -> None:
    """Raise unless ``x`` is a tensor on the device of every parameter and of its dtype (any
    floating dtype that autocast casts, while it is on, as for nn.Linear). Mixed devices must
    fail before any work: some torch ops (baddbmm, conv2d) would otherwise return a tensor of
    uninitialised memory or one on the wrong device."""
    if not isinstance(x, Tensor):
        raise TypeError(f"input: expected a tensor, got {type(x).__name__}")
    for name, p in params:
        if p is None:
            continue
        if x.device != p.device:
            raise ValueError(
                f"input: expected a tensor on {p.device} (the device of the layer's {name}), got one on {x.device}"
            )
        if x.dtype != p.dtype and not autocast_casts(x, p):
            raise TypeError(
                f"input: expected dtype {p.dtype} (the dtype of the layer's {name}; under "
                f"torch.autocast any dtype it casts), got {x.dtype}"
            )


def autocast_casts(x: Tensor, p: Tensor) -> bool:
    """Whether autocast is on for x's device and casts both x and p (floating types other than
    float64, as for nn.Linear), so that their dtypes need not match."""
    device = x.device.type
    return (
        torch.amp.is_autocast_available(device)
        and torch.is_autocast_enabled(device)
        and x.is_floating_point()
        and p.is_floating_point()
        and torch.float64 not in (x.dtype, p.dtype)
    )
