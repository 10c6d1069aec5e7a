"""When a fast path may call the extension directly instead of going through torch ops.

The extension reads tensors through DLPack, outside PyTorch's dispatcher: whatever records
or transforms the computation (torch.compile and torch.export, torch.jit.trace, torch.func's
vmap/grad/jacrev, forward-mode AD, fake and other subclassed tensors) would see no operation at all and keep
uninitialised memory. Those callers must take the traceable torch (or custom-op) path.
"""

from __future__ import annotations

import torch
from torch import Tensor

# not fake, functional or otherwise subclassed tensors
PLAIN_TENSOR_TYPES = (Tensor, torch.nn.Parameter)


def transforming() -> bool:
    """True inside a torch.func transform (vmap, grad, jacrev, jvp, ...) or while a
    forward-mode AD level is open: tensors may be batched or carry tangents that only torch's
    own ops (which have batching and forward-mode rules) propagate."""
    return torch._C._are_functorch_transforms_active() or torch.autograd.forward_ad._current_level >= 0


def recording() -> bool:
    """True while torch.compile / torch.export, torch.jit.trace, a torch.func transform or
    forward-mode AD is recording or transforming the computation."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or transforming()


def plain_eager(*tensors: Tensor | None) -> bool:
    """True when nothing records the computation and every given tensor (None skipped) is a
    plain, materialised CPU tensor the extension may read directly."""
    return not recording() and all(
        t is None or (type(t) in PLAIN_TENSOR_TYPES and t.device.type == "cpu") for t in tensors
    )
