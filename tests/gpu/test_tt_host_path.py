"""What one TTLinear call costs the host on the CUDA path (issue 24, item 3): the extension
calls and the torch operations a forward and a backward issue, counted and pinned, so a change
that adds host work shows here first; and no host-device synchronization (on a real GPU).

Counted at the dispatcher's top level (TorchDispatchMode): the custom op's own inside work
(output and workspace allocation from torch's caching allocator, the one extension call) shows
as the op. Under the CPU emulation CPU tensors play the GPU through the same host code.
"""

from __future__ import annotations

import collections

import pytest
import torch
from gpu_util import DEV, GPU, REAL_GPU
from torch.utils._python_dispatch import TorchDispatchMode

import tensorpress  # noqa: F401  (registers the ops)
from tensorpress import _cuda_kernels
from tensorpress.nn import TTLinear

pytestmark = GPU


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def extension_calls(monkeypatch):
    """Counts every call into the active kernels module (the CUDA build's or the emulation's)."""
    calls = collections.Counter()
    active = _cuda_kernels.active()
    module = active.module

    class Counting:
        def __getattr__(self, name):
            attr = getattr(module, name)
            if not callable(attr):
                return attr

            def counted(*args, **kwargs):
                calls[name] += 1
                return attr(*args, **kwargs)

            return counted

    monkeypatch.setattr(active, "module", Counting())
    return calls


# Top-level op counts for TTLinear 256 -> 256, ranks 8, bias, batch 16 (one step per core):
# - forward with autograd: the 4 cores laid out as step matrices (permute, clone, view each),
#   a view of x, the custom op;
# - its backward: the op's backward, then the step-matrix gradients folded back to core
#   gradients (view, permute, copy into the cores' layout each) and detaches;
# - no-grad forward: the same layout, then the extension called directly (no custom op), so
#   its own work shows: detaches of x and the 4 matrices, output and workspace allocation
#   (torch's caching allocator), the bias added in place.
PINNED = {"forward": 14, "backward": 24, "no_grad_forward": 21}


def test_one_extension_call_per_forward_and_per_backward_and_pinned_torch_ops(extension_calls):
    layer = TTLinear(256, 256, ranks=8, bias=True).to(DEV)
    x = torch.randn(16, 256, device=DEV, requires_grad=True)
    gy = torch.randn(16, 256, device=DEV)
    layer(x).backward(gy)  # warm: tables built, plans cached
    with torch.no_grad():
        layer(x)
    # the pinned counts are this plan's: one step per core (no merges), on one of our kernels
    plan = tensorpress.ops.tt.plan_for(list(layer.cores), 16)
    assert plan.groups == ((0,), (1,), (2,), (3,)) and plan.path in ("fused", "tiled"), plan
    extension_calls.clear()
    counts = {}
    with _CountOps() as mode:
        y = layer(x)
    counts["forward"] = mode.ops
    assert dict(extension_calls) == {"tt_forward": 1}
    with _CountOps() as mode:
        y.backward(gy)
    counts["backward"] = mode.ops
    assert dict(extension_calls) == {"tt_forward": 1, "tt_backward": 1}
    with torch.no_grad(), _CountOps() as mode:
        layer(x)
    counts["no_grad_forward"] = mode.ops
    assert extension_calls["tt_forward"] == 2
    for phase, pinned in PINNED.items():
        assert sum(counts[phase].values()) == pinned, (phase, dict(counts[phase]))


@REAL_GPU
def test_forward_and_backward_never_synchronize_with_the_host():
    layer = TTLinear(256, 256, ranks=8, bias=True).to(DEV)
    x = torch.randn(16, 256, device=DEV, requires_grad=True)
    gy = torch.randn(16, 256, device=DEV)
    layer(x).backward(gy)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        layer(x).backward(gy)
        with torch.no_grad():
            layer(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@REAL_GPU
def test_training_step_captured_in_one_cuda_graph():
    """Forward and backward (the custom op and its backward: one extension call each, workspaces
    from the caching allocator, no synchronization) replay from one CUDA graph."""
    torch.manual_seed(1)
    layer = TTLinear(256, 256, ranks=8, bias=True).to(DEV)
    static_x = torch.randn(16, 256, device=DEV, requires_grad=True)
    gy = torch.randn(16, 256, device=DEV)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm: plans, tables, allocator pools
            layer.zero_grad(set_to_none=False)
            layer(static_x).backward(gy)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    layer.zero_grad(set_to_none=False)
    with torch.cuda.graph(graph):
        static_y = layer(static_x)
        static_y.backward(gy)
    x2 = torch.randn(16, 256, device=DEV)
    with torch.no_grad():
        static_x.copy_(x2)
        for p in layer.parameters():
            p.grad.zero_()
    graph.replay()
    torch.cuda.synchronize()
    ref = TTLinear(256, 256, ranks=8, bias=True).to(DEV)
    ref.load_state_dict(layer.state_dict())
    xr = x2.clone().requires_grad_()
    yr = ref(xr)
    yr.backward(gy)
    torch.testing.assert_close(static_y, yr, rtol=1e-5, atol=1e-5)
    for p, q in zip(layer.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5)


@REAL_GPU
def test_compiled_with_reduce_overhead_matches_eager():
    torch.manual_seed(2)
    layer = TTLinear(256, 256, ranks=8, bias=True).to(DEV)
    fast = torch.compile(layer, mode="reduce-overhead")
    for _ in range(3):  # the CUDA graph is recorded after the first calls
        x = torch.randn(16, 256, device=DEV)
        with torch.no_grad():
            torch.testing.assert_close(fast(x).clone(), layer(x), rtol=1e-5, atol=1e-5)
