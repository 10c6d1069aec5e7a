"""Every layer through what PyTorch users do with a layer.

One list of layers (LAYERS); every check below runs on each of them against a float64
reference built from the layer's current weights (`to_conv()` / `to_dense()`). A new layer
gets all of this by being added to LAYERS. Sizes: the "small" entries keep gradcheck cheap;
the larger ones are big enough to take the extension's fast paths (the fused TT kernel, the
OpenBLAS pointwise stages), which is where recording and caching bugs hide.
"""

from __future__ import annotations

import copy
import io
import pickle
import threading
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tensorpress.nn import CPConv2d, LowRankLinear, TTLinear, TuckerConv2d


@dataclass(frozen=True)
class Spec:
    name: str
    make: Callable[..., nn.Module]  # make(dtype=...) -> layer
    input_shape: tuple[int, ...]  # one batch of input
    small: bool  # cheap enough for gradcheck / gradgradcheck

    def __str__(self) -> str:
        return self.name


LAYERS = [
    Spec(
        "tt_small",
        lambda **f: TTLinear(24, 12, ranks=(3, 2), in_factors=(2, 3, 4), out_factors=(2, 3, 2), **f),
        (5, 24),
        True,
    ),
    # fused at this batch (a plan of two merged groups), where the small one takes the dense route
    Spec("tt_large", lambda **f: TTLinear(256, 256, ranks=4, **f), (64, 256), False),
    Spec("lowrank_small", lambda **f: LowRankLinear(24, 12, rank=3, **f), (5, 24), True),
    Spec("lowrank_large", lambda **f: LowRankLinear(512, 256, rank=64, **f), (64, 512), False),
    Spec("cp_small", lambda **f: CPConv2d(3, 4, 3, rank=4, padding=1, **f), (2, 3, 5, 5), True),
    Spec("cp_large", lambda **f: CPConv2d(32, 32, 3, rank=32, padding=1, **f), (2, 32, 16, 16), False),
    Spec("tucker_small", lambda **f: TuckerConv2d(3, 4, 3, ranks=(2, 3), padding=1, **f), (2, 3, 5, 5), True),
    # the other geometries: stride; a kernel past MAX_FUSED_DEPTHWISE (two 1-D depthwise convs)
    # on a reflect-padded input; dilation with "same" padding
    Spec("cp_strided", lambda **f: CPConv2d(3, 4, 3, rank=3, stride=2, padding=1, **f), (2, 3, 7, 6), True),
    Spec(
        "cp_separable",
        lambda **f: CPConv2d(2, 3, (9, 3), rank=2, padding=(4, 1), padding_mode="reflect", **f),
        (2, 2, 10, 6),
        True,
    ),
    Spec(
        "tucker_dilated", lambda **f: TuckerConv2d(3, 5, 3, (4, 2), padding="same", dilation=2, **f), (2, 3, 7, 6), True
    ),
    Spec("tucker_large", lambda **f: TuckerConv2d(32, 32, 3, ranks=(16, 16), padding=1, **f), (2, 32, 16, 16), False),
]
SMALL = [s for s in LAYERS if s.small]


def build(spec: Spec, dtype=torch.float32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return spec.make(dtype=dtype)


def batch(spec: Spec, dtype=torch.float32, seed: int = 1, requires_grad: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(spec.input_shape, generator=g, dtype=dtype).requires_grad_(requires_grad)


def reference(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's output from its current weights, by the dense torch layer in float64."""
    with torch.no_grad():
        dense = layer.to_conv() if hasattr(layer, "to_conv") else None
        x64 = x.detach().double()
        if dense is not None:
            return dense.double()(x64)
        bias = None if layer.bias is None else layer.bias.detach().double()
        return F.linear(x64, layer.to_dense().detach().double(), bias)


def assert_matches_reference(layer, x, y, tol=None):
    ref = reference(layer, x)
    tol = tol if tol is not None else (1e-10 if y.dtype == torch.float64 else 2e-5)
    err = ((y.detach().double() - ref).norm() / ref.norm()).item()
    assert err < tol, f"relative error {err:.3g} against the float64 dense reference (tolerance {tol})"


def parametrize(specs):
    return pytest.mark.parametrize("spec", specs, ids=str)


# ----------------------------------------------------------------------------- round trips
@parametrize(LAYERS)
def test_state_dict_round_trip(spec):
    layer, fresh = build(spec), build(spec, seed=7)
    x = batch(spec)
    with torch.no_grad():
        layer(x), fresh(x)  # both prepare whatever they cache
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf))
    with torch.no_grad():
        assert torch.equal(fresh(x), layer(x))
    assert_matches_reference(fresh, x, fresh(x))


@parametrize(LAYERS)
def test_pickle_and_deepcopy_round_trip_without_derived_state(spec):
    layer = build(spec)
    x = batch(spec)
    before = len(pickle.dumps(layer))
    with torch.no_grad():
        y = layer(x)
    # nothing a forward caches is pickled: the pickle does not grow after a forward
    assert len(pickle.dumps(layer)) == before
    for twin in (pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer)):
        with torch.no_grad():
            assert torch.equal(twin(x), y)
        # independent parameters: editing the copy leaves the original as it was
        with torch.no_grad():
            for p in twin.parameters():
                p.mul_(2)
        with torch.no_grad():
            assert torch.equal(layer(x), y)
            assert_matches_reference(twin, x, twin(x))


@parametrize(LAYERS)
@pytest.mark.parametrize("convert", ["to_float64", "double"])
def test_dtype_conversion_after_a_forward(spec, convert):
    layer = build(spec)
    x = batch(spec)
    with torch.no_grad():
        layer(x)
    layer = layer.to(torch.float64) if convert == "to_float64" else layer.double()
    x64 = x.double()
    with torch.no_grad():
        y = layer(x64)
    assert y.dtype == torch.float64
    assert_matches_reference(layer, x64, y)
    y = layer(x64)  # and with autograd
    y.sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float64 for p in layer.parameters())


# ----------------------------------------------------------------------------- writes behind autograd's back
def _edits(layer):
    """Ways users change weights in place outside autograd, each applied to a live layer."""

    def data_mul(_):
        for p in layer.parameters():
            p.data.mul_(2)

    def data_assign(_):
        for p in layer.parameters():
            p.data = torch.randn_like(p)

    def vector_to_parameters(_):
        vec = nn.utils.parameters_to_vector(layer.parameters())
        nn.utils.vector_to_parameters(vec * 1.5 + 0.01, layer.parameters())

    def ema_update(_):
        for p in layer.parameters():
            p.data.mul_(0.9).add_(0.1 * torch.ones_like(p))

    return {
        "data_mul": data_mul,
        "data_assign": data_assign,
        "vector_to_parameters": vector_to_parameters,
        "ema_update": ema_update,
    }


@parametrize(LAYERS)
@pytest.mark.parametrize("edit", ["data_mul", "data_assign", "vector_to_parameters", "ema_update"])
def test_weight_edits_reach_the_next_forward(spec, edit):
    layer = build(spec)
    x = batch(spec)
    with torch.no_grad():
        layer(x)  # primes any inference cache
    _edits(layer)[edit](layer)
    with torch.no_grad():
        assert_matches_reference(layer, x, layer(x))
    frozen_eval = layer(x)  # grad mode on
    assert_matches_reference(layer, x, frozen_eval)
    for p in layer.parameters():
        p.requires_grad_(False)
    _edits(layer)[edit](layer)
    assert_matches_reference(layer, x, layer(x))  # frozen parameters take the no-grad paths too


# ----------------------------------------------------------------------------- gradients
@parametrize(SMALL)
def test_gradcheck_and_gradgradcheck(spec):
    layer = build(spec, dtype=torch.float64)
    x = batch(spec, dtype=torch.float64, requires_grad=True)
    params = tuple(layer.parameters())
    names = [n for n, _ in layer.named_parameters()]

    def f(x, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps)), (x,))

    # functional_call runs the layer's own forward, eager (not a torch.func transform)
    p = tuple(q.detach().clone().requires_grad_() for q in params)
    # fast mode: the Jacobians compared along random directions (slow mode costs minutes here)
    assert torch.autograd.gradcheck(f, (x, *p), fast_mode=True)
    assert torch.autograd.gradgradcheck(f, (x, *p), fast_mode=True)


@parametrize(LAYERS)
def test_gradient_penalty_matches_dense_reference(spec):
    """Second-order gradients (create_graph=True) on the layer's own eager paths."""
    layer = build(spec, dtype=torch.float64)
    x = batch(spec, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    got = torch.autograd.grad(gx.square().sum(), list(layer.parameters()), allow_unused=True)

    def dense_of_parameters(t):
        # the dense layer (its geometry and padding mode) with the weight rebuilt differentiably
        # from the layer's own parameters
        w = layer.to_dense()
        if w.dim() == 2:
            return F.linear(t, w, layer.bias)
        return torch.func.functional_call(layer.to_conv(), {"weight": w, "bias": layer.bias}, (t,))

    (gd,) = torch.autograd.grad(dense_of_parameters(x).square().sum(), x, create_graph=True)
    want = torch.autograd.grad(gd.square().sum(), list(layer.parameters()), allow_unused=True)
    for g, w in zip(got, want):
        w = torch.zeros(()) if w is None else w
        assert g is not None, "a second-order gradient was dropped"
        assert torch.allclose(g, w, rtol=1e-8, atol=1e-10 * max(1.0, w.abs().max().item()))


# ----------------------------------------------------------------------------- recording and transforms
@parametrize(LAYERS)
@pytest.mark.parametrize("mode", ["no_grad", "frozen", "grad"])
def test_jit_trace_records_the_computation(spec, mode):
    layer = build(spec)
    if mode == "frozen":
        for p in layer.parameters():
            p.requires_grad_(False)
    x, other = batch(spec), batch(spec, seed=5)
    ctx = torch.no_grad() if mode == "no_grad" else torch.enable_grad()
    with ctx:
        traced = torch.jit.trace(layer, x, check_trace=False)
        y = traced(other)
    assert_matches_reference(layer, other, y)
    with torch.no_grad():
        for p in layer.parameters():  # the trace reads the parameters, it did not bake them in
            p.mul_(0.5)
        assert_matches_reference(layer, other, traced(other))


@parametrize(LAYERS)
def test_torch_compile_matches_eager(spec):
    layer = build(spec)
    x = batch(spec)
    compiled = torch.compile(layer, backend="aot_eager")
    y = compiled(x)
    assert_matches_reference(layer, x, y)
    y.sum().backward()
    grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    layer(x).sum().backward()
    for g, p in zip(grads, layer.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-5)


@parametrize(LAYERS)
@pytest.mark.parametrize("strict", [False, True])
def test_torch_export(spec, strict):
    layer = build(spec)
    x, other = batch(spec), batch(spec, seed=5)
    program = torch.export.export(layer, (x,), strict=strict)
    assert_matches_reference(layer, other, program.module()(other))


@parametrize(LAYERS)
def test_autocast_follows_the_dense_layer(spec):
    layer = build(spec)
    x = batch(spec)
    dense = layer.to_conv() if hasattr(layer, "to_conv") else nn.Linear(1, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        want_dtype = dense(x).dtype if hasattr(layer, "to_conv") else F.linear(x, layer.to_dense().detach()).dtype
    assert y.dtype == want_dtype == torch.bfloat16
    # bf16 inputs and weights: a few bf16 roundings
    assert_matches_reference(layer, x, y.float(), tol=5e-2)
    y.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == p.dtype for p in layer.parameters())


@parametrize(LAYERS)
def test_vmap_matches_a_loop(spec):
    layer = build(spec)
    xs = torch.stack([batch(spec, seed=s) for s in range(3)])
    y = torch.func.vmap(layer)(xs)
    for i in range(3):
        assert_matches_reference(layer, xs[i], y[i])


@parametrize(SMALL)
def test_jacrev_matches_the_dense_jacobian(spec):
    layer = build(spec, dtype=torch.float64)
    x = batch(spec, dtype=torch.float64)[:1]
    jac = torch.func.jacrev(layer)(x)
    dense = layer.to_conv() if hasattr(layer, "to_conv") else None
    want = torch.func.jacrev(
        dense if dense is not None else (lambda t: F.linear(t, layer.to_dense().detach(), layer.bias.detach()))
    )(x)
    torch.testing.assert_close(jac, want, rtol=1e-10, atol=1e-12)


@parametrize(SMALL)
def test_func_grad_matches_autograd(spec):
    layer = build(spec, dtype=torch.float64)
    x = batch(spec, dtype=torch.float64)
    params = {k: v.detach() for k, v in layer.named_parameters()}
    got = torch.func.grad(lambda p: torch.func.functional_call(layer, p, (x,)).square().sum())(params)
    layer.zero_grad()
    layer(x).square().sum().backward()
    for name, p in layer.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- concurrency and misuse
@parametrize(LAYERS)
def test_four_threads_at_once(spec):
    layer = build(spec)
    inputs = [batch(spec, seed=s) for s in range(4)]
    wants = [reference(layer, x) for x in inputs]
    errors = []

    def work(i):
        try:
            for step in range(6):
                if step % 2:
                    with torch.no_grad():
                        y = layer(inputs[i])
                else:
                    y = layer(inputs[i])
                    y.sum().backward(inputs=[inputs[i].requires_grad_()])
                err = ((y.detach().double() - wants[i]).norm() / wants[i].norm()).item()
                if err > 2e-5:
                    errors.append((i, step, err))
        except Exception as e:  # noqa: BLE001 - reported below with the thread's index
            errors.append((i, repr(e)))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


@parametrize(LAYERS)
def test_input_on_another_device_is_refused(spec):
    layer = build(spec)
    x = batch(spec).to("meta")
    with pytest.raises((ValueError, RuntimeError), match="device"):
        layer(x)


@parametrize(LAYERS)
def test_input_of_another_dtype_is_refused(spec):
    layer = build(spec)
    with pytest.raises((TypeError, RuntimeError), match="dtype|type"):
        layer(batch(spec, dtype=torch.float64))


# ----------------------------------------------------------------------------- every TT plan, every path
_TT_SHAPES = ((1, 2, 3, 2), (2, 3, 2, 3), (3, 2, 2, 1))


def _tt_plans():
    from tensorpress.ops.tt_plan import ranked_plans

    return ranked_plans(_TT_SHAPES, 3, True, False)


@pytest.mark.parametrize("path", ["eager", "custom_op"])
@pytest.mark.parametrize("plan_index", range(len(_tt_plans())))
def test_tt_every_plan_is_twice_differentiable(plan_index, path):
    """gradcheck and gradgradcheck of tt_matmul on every plan (fused partitions and orders,
    and the dense route), through the eager training node and through the custom op (which
    runs when the step matrices are prepared by the caller, and under torch.compile)."""
    from tensorpress.ops.tt import prepare_tt, tt_matmul

    plan = _tt_plans()[plan_index]
    g = torch.Generator().manual_seed(plan_index)
    cores = [torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True) for s in _TT_SHAPES]
    x = torch.randn(3, 12, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(12, generator=g, dtype=torch.float64, requires_grad=True)

    def f(x, bias, *cores):
        prepared = prepare_tt(list(cores), plan) if path == "custom_op" else None
        return tt_matmul(x, list(cores), plan=plan, prepared=prepared, bias=bias)

    assert torch.autograd.gradcheck(f, (x, bias, *cores))
    assert torch.autograd.gradgradcheck(f, (x, bias, *cores), fast_mode=True)


@parametrize(LAYERS)
@pytest.mark.parametrize("grad", [False, True])
def test_forward_mode_ad_keeps_the_tangent(spec, grad):
    layer = build(spec, dtype=torch.float64)
    x, tangent = batch(spec, dtype=torch.float64), batch(spec, dtype=torch.float64, seed=9)
    import torch.autograd.forward_ad as fwAD

    with torch.set_grad_enabled(grad), fwAD.dual_level():
        primal, out_tangent = fwAD.unpack_dual(layer(fwAD.make_dual(x, tangent)))
    assert out_tangent is not None, "the tangent was dropped"
    # the layer is linear in x: the tangent is the layer without its bias applied to the tangent
    want = reference(layer, tangent) - reference(layer, torch.zeros_like(tangent))
    torch.testing.assert_close(out_tangent, want, rtol=1e-9, atol=1e-11)
    assert_matches_reference(layer, x, primal)
