"""CPConv2d, TuckerConv2d and LowRankLinear through PyTorch's machinery (issue 27): jit.trace,
export, torch.func, forward-mode AD, autocast, devices and dtypes, round trips, .data edits,
gradcheck/gradgradcheck and threads, each against a float64 dense reference rebuilt from the
layer's current factors; and the constructors' validation of rank and dtype."""
from __future__ import annotations

import copy
import pickle
import threading
import warnings
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.func import functional_call, grad, jacrev, jvp, vmap
from torch.nn import functional as F

from tensorpress.linalg import blas
from tensorpress.nn import CPConv2d, LowRankLinear, TuckerConv2d

from conftest import rel_err


@dataclass(frozen=True)
class Spec:
    name: str
    build: Callable[[torch.dtype], nn.Module]
    sample: tuple[int, ...]          # one sample's shape (the input is (batch, *sample))

    def layer(self, dtype=torch.float32, seed=0) -> nn.Module:
        torch.manual_seed(seed)
        return self.build(dtype)

    def input(self, batch=2, dtype=torch.float32, seed=1) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(batch, *self.sample, generator=gen, dtype=torch.float64).to(dtype)


SPECS = [
    Spec("cp", lambda dt: CPConv2d(3, 4, 3, rank=3, stride=2, padding=1, dtype=dt), (3, 7, 6)),
    # beyond MAX_FUSED_DEPTHWISE: the two 1-D depthwise convs, on an explicitly padded input
    Spec("cp_separable", lambda dt: CPConv2d(2, 3, (9, 3), rank=2, padding=(4, 1), padding_mode="reflect",
                                             dtype=dt), (2, 10, 6)),
    # 16 x 16 x 256 multiply-adds per 1x1 stage: large enough for the extension's GEMM (blas.MIN_WORK)
    Spec("cp_fast", lambda dt: CPConv2d(16, 16, 3, rank=16, padding=1, dtype=dt), (16, 16, 16)),
    Spec("tucker", lambda dt: TuckerConv2d(3, 5, 3, (4, 2), padding="same", dilation=2, dtype=dt), (3, 7, 6)),
    Spec("lowrank", lambda dt: LowRankLinear(6, 5, 2, dtype=dt), (6,)),
]
SMALL = [s for s in SPECS if s.name != "cp_fast"]
FAST = next(s for s in SPECS if s.name == "cp_fast")
ids = [s.name for s in SPECS]


# ---------------------------------------------------------------------- the float64 reference
def dense_weight(layer: nn.Module, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """The dense weight the factors in ``params`` stand for (differentiable in them)."""
    if isinstance(layer, LowRankLinear):
        return params["second"] @ params["first"]
    if isinstance(layer, CPConv2d):
        return torch.einsum("or,ri,rh,rw->oihw", params["pointwise_out"][:, :, 0, 0],
                            params["pointwise_in"][:, :, 0, 0], params["depthwise_h"][:, 0, :, 0],
                            params["depthwise_w"][:, 0, 0, :])
    return torch.einsum("oa,abhw,bi->oihw", params["last"][:, :, 0, 0], params["core"], params["first"][:, :, 0, 0])


def dense_forward(layer: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """nn.Linear / nn.Conv2d (the layer's geometry) with the dense weight of ``params``."""
    w, bias = dense_weight(layer, params), params.get("bias")
    if isinstance(layer, LowRankLinear):
        return F.linear(x, w, bias)
    conv = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                     layer.dilation, bias=False, padding_mode=layer.padding_mode, device="meta")
    return conv._conv_forward(x, w, bias)


def reference(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The dense layer's output in float64, from the layer's current factors."""
    params = {k: v.detach().to(torch.float64) for k, v in layer.named_parameters()}
    return dense_forward(layer, params, x.detach().to(torch.float64))


def _refuse_extension(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the extension's GEMM was called")
    monkeypatch.setattr(blas._C, "blas_gemm", refuse)


def test_plain_eager_inference_keeps_the_extension_fast_path(monkeypatch):
    """The fallbacks below must not cost the ordinary eager call its fast path."""
    calls = []
    gemm = blas._C.blas_gemm
    monkeypatch.setattr(blas._C, "blas_gemm", lambda *a: (calls.append(1), gemm(*a))[1])
    layer, x = FAST.layer(), FAST.input()
    with torch.no_grad():
        y = layer(x)
    assert calls and rel_err(y, reference(layer, x)) < 1e-5


# ---------------------------------------------------------------------- item 3: jit.trace
@pytest.mark.parametrize("mode", ["no_grad", "frozen"])
@pytest.mark.parametrize("spec", SPECS, ids=ids)
def test_jit_trace_records_the_computation(spec, mode):
    layer, x = spec.layer(), spec.input()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        if mode == "frozen":
            layer.requires_grad_(False)
            traced = torch.jit.trace(layer, x, check_trace=False)
        else:
            with torch.no_grad():
                traced = torch.jit.trace(layer, x, check_trace=False)
    new = spec.input(batch=3, seed=7)
    with torch.no_grad():
        assert rel_err(traced(new), reference(layer, new)) < 1e-5
        assert rel_err(traced(new), layer(new)) < 1e-6


# ---------------------------------------------------------------------- item 7: devices, dtypes
@pytest.mark.parametrize("spec", SPECS, ids=ids)
def test_input_on_another_device_is_refused_before_any_work(spec):
    layer = spec.layer()
    with pytest.raises(ValueError, match=r"input: expected a tensor on cpu .* got one on meta"):
        layer(spec.input().to("meta"))
    with pytest.raises(ValueError, match=r"input: expected a tensor on meta .* got one on cpu"):
        spec.layer().to("meta")(spec.input())
    # a meta layer on meta input still works (shape inference)
    assert spec.layer().to("meta")(spec.input().to("meta")).shape == layer(spec.input()).shape


@pytest.mark.parametrize("spec", SPECS, ids=ids)
def test_input_of_another_dtype_is_refused(spec):
    layer = spec.layer()
    with pytest.raises(TypeError, match=r"input: expected dtype torch.float32 .* got torch.float64"):
        layer(spec.input(dtype=torch.float64))
    with pytest.raises(TypeError, match=r"input: expected dtype torch.float32 .* got torch.bfloat16"):
        layer(spec.input(dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="input: expected a tensor, got list"):
        layer([1.0])


# ---------------------------------------------------------------------- item 9: autocast
@pytest.mark.parametrize("spec", SPECS, ids=ids)
def test_autocast_follows_like_nn_linear_and_conv2d(spec, monkeypatch):
    layer, x = spec.layer(), spec.input()
    dense = layer.to_linear() if isinstance(layer, LowRankLinear) else layer.to_conv()
    ref = reference(layer, x)
    _refuse_extension(monkeypatch)            # every product must go through autocast's casts
    for grad_mode in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(grad_mode):
            y, y_dense = layer(x), dense(x)
            y_bf16_input = layer(x.to(torch.bfloat16))      # autocast casts any floating input
        assert y.dtype == y_dense.dtype == torch.bfloat16
        assert rel_err(y, ref) < 3e-2 and rel_err(y_bf16_input, ref) < 3e-2
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(TypeError, match="float64"):
        layer(x.double())                                    # as nn.Linear: float64 is not cast


# ---------------------------------------------------------------------- item 10: torch.export
@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("spec", SPECS, ids=ids)
def test_export_matches_eager(spec, strict):
    layer, x = spec.layer(), spec.input()
    program = torch.export.export(layer, (x,), strict=strict)
    new = spec.input(seed=8)
    with torch.no_grad():
        assert rel_err(program.module()(new), layer(new)) < 1e-6
        assert rel_err(program.module()(new), reference(layer, new)) < 1e-5


# ---------------------------------------------------------------------- item 11: torch.func
@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("spec", SPECS, ids=ids)
def test_vmap_matches_the_dense_reference(spec, frozen):
    layer = spec.layer(torch.float64).requires_grad_(not frozen)
    xs = torch.stack([spec.input(dtype=torch.float64, seed=s) for s in range(3)])    # (3, batch, *sample)
    with torch.no_grad():
        ys = vmap(layer)(xs)
    assert rel_err(ys, torch.stack([reference(layer, x) for x in xs])) < 1e-12
    ys_in = vmap(layer, in_dims=1, out_dims=1)(xs.transpose(0, 1).contiguous().transpose(0, 1))
    assert rel_err(ys_in, ys) < 1e-12


@pytest.mark.parametrize("spec", SPECS, ids=ids)
def test_func_grad_matches_the_dense_reference(spec):
    layer, x = spec.layer(torch.float64), spec.input(dtype=torch.float64)
    params = {k: v.detach() for k, v in layer.named_parameters()}
    weight = torch.randn_like(reference(layer, x))

    def loss(p):
        return (functional_call(layer, p, (x,)) * weight).sum()

    got = grad(loss)(params)
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    want = torch.autograd.grad((dense_forward(layer, leaves, x) * weight).sum(), list(leaves.values()))
    for (name, g), w in zip(got.items(), want):
        assert rel_err(g, w) < 1e-12, name


@pytest.mark.parametrize("spec", SMALL, ids=[s.name for s in SMALL])
def test_jacrev_matches_the_dense_jacobian(spec):
    layer, x = spec.layer(torch.float64), spec.input(batch=1, dtype=torch.float64)
    params = {k: v.detach() for k, v in layer.named_parameters()}
    got = jacrev(layer)(x)
    want = jacrev(lambda t: dense_forward(layer, params, t))(x)
    assert rel_err(got, want) < 1e-12


@pytest.mark.parametrize("spec", SPECS, ids=ids)
def test_forward_mode_ad_keeps_the_tangent(spec):
    layer, x = spec.layer(torch.float64), spec.input(dtype=torch.float64)
    t = spec.input(dtype=torch.float64, seed=9)
    params = {k: v.detach() for k, v in layer.named_parameters()}
    want = jvp(lambda u: dense_forward(layer, params, u), (x,), (t,))[1]
    assert rel_err(jvp(layer, (x,), (t,))[1], want) < 1e-12
    # torch.autograd.forward_ad without autograd: the dual input's tangent must not be dropped
    with torch.no_grad(), fwAD.dual_level():
        tangent = fwAD.unpack_dual(layer(fwAD.make_dual(x, t))).tangent
    assert tangent is not None and rel_err(tangent, want) < 1e-12


# ---------------------------------------------------------------------- item 13: validation
def test_cp_rank_above_the_largest_cp_rank_is_refused_before_allocating():
    # a (4, 3, 3, 3) kernel has CP rank at most 4 * 3 * 3 * 3 / 4 = 27
    with pytest.raises(ValueError, match="rank: expected at most 27 for a kernel of shape"):
        CPConv2d(3, 4, 3, rank=10 ** 12)   # 12 TB of factors
    with pytest.raises(ValueError, match="rank: expected at most 27"):
        CPConv2d(3, 4, 3, rank=28)
    assert CPConv2d(3, 4, 3, rank=27).rank == 27
    # a 1x1 conv is a matrix: rank at most min(out, in)
    with pytest.raises(ValueError, match="rank: expected at most 3"):
        CPConv2d(3, 8, 1, rank=4)
    with pytest.raises(ValueError, match="rank: expected at most 27"):
        CPConv2d.from_dense(nn.Conv2d(3, 4, 3), rank=28)


def test_tucker_rank_capped_past_dense_warns_with_the_ranks_and_counts():
    with pytest.warns(UserWarning, match=r"ranks: \(40, 40\) capped to \(4, 4\).* 176 factor parameters.* 144"):
        TuckerConv2d(4, 4, 3, (40, 40))
    with pytest.warns(UserWarning, match=r"ranks: \(30, 30\) capped to \(2, 2\).* 68 factor parameters.* 60"):
        TuckerConv2d.from_dense(nn.Conv2d(2, 30, 1), ranks=30)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TuckerConv2d(4, 4, 3, (4, 4))                     # asked for: no cap, no warning
        TuckerConv2d(2, 64, 3, (8, 8))                    # capped to (8, 2) but still smaller
        TuckerConv2d.from_dense(nn.Conv2d(8, 8, 3), ranks=(2, 2))


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128, torch.int64])
def test_non_real_floating_dtypes_are_refused_at_construction(dtype):
    for build in (lambda: CPConv2d(3, 4, 3, 2, dtype=dtype), lambda: TuckerConv2d(3, 4, 3, 2, dtype=dtype),
                  lambda: LowRankLinear(3, 4, 2, dtype=dtype)):
        with pytest.raises(TypeError, match=f"dtype: expected float32, float64, float16 or bfloat16.*{dtype}"):
            build()
    with pytest.raises(TypeError, match="dtype"):
        CPConv2d.from_dense(nn.Conv2d(3, 4, 3, dtype=torch.complex64), 2)


# ---------------------------------------------------------------------- round trips and edits
@pytest.mark.parametrize("spec", SPECS, ids=ids)
def test_state_dict_pickle_and_deepcopy_round_trips(spec):
    layer, x = spec.layer(), spec.input()
    fresh = spec.layer(seed=3)
    fresh.load_state_dict(layer.state_dict())
    with torch.no_grad():
        y = layer(x)
        for other in (fresh, pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer)):
            assert torch.equal(other(x), y)
    assert rel_err(y, reference(layer, x)) < 1e-5


@pytest.mark.parametrize("convert", ["double", "to"])
@pytest.mark.parametrize("spec", SPECS, ids=ids)
def test_conversion_to_float64(spec, convert):
    layer, x = spec.layer(), spec.input(dtype=torch.float64)
    layer = layer.double() if convert == "double" else layer.to(torch.float64)
    for grad_mode in (False, True):
        with torch.set_grad_enabled(grad_mode):
            y = layer(x)
        assert y.dtype == torch.float64 and rel_err(y, reference(layer, x)) < 1e-12
    y32 = layer.float()(x.float())
    assert y32.dtype == torch.float32 and rel_err(y32, reference(layer, x)) < 1e-5


@pytest.mark.parametrize("spec", SPECS, ids=ids)
def test_data_edits_reach_the_next_forward(spec):
    layer, x = spec.layer(torch.float64), spec.input(dtype=torch.float64)
    first = next(layer.parameters())

    def check():
        with torch.no_grad():
            assert rel_err(layer(x), reference(layer, x)) < 1e-12
        y = layer(x)
        assert rel_err(y, reference(layer, x)) < 1e-12
        y.sum().backward()

    check()
    first.data.mul_(2)
    check()
    first.data = torch.randn_like(first)
    check()
    n = sum(p.numel() for p in layer.parameters())
    nn.utils.vector_to_parameters(torch.randn(n, dtype=torch.float64) * 0.3, layer.parameters())
    check()


@pytest.mark.parametrize("spec", SPECS, ids=ids)
def test_gradcheck_and_gradgradcheck_in_float64(spec):
    layer = spec.layer(torch.float64)
    names = [k for k, _ in layer.named_parameters()]
    fast = spec is FAST                 # 4096 input entries: the randomized check
    x = spec.input(batch=1, dtype=torch.float64).requires_grad_(True)
    params = [p.detach().clone().requires_grad_(True) for p in layer.parameters()]

    def fn(x, *ps):
        return functional_call(layer, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(fn, (x, *params), fast_mode=fast)
    assert torch.autograd.gradgradcheck(fn, (x, *params), fast_mode=fast)


@pytest.mark.parametrize("spec", SPECS, ids=ids)
def test_four_threads_calling_forward_concurrently(spec):
    layer = spec.layer()
    inputs = [spec.input(seed=s) for s in range(4)]
    with torch.no_grad():
        expected = [layer(x) for x in inputs]
    expected_grads = [torch.autograd.grad(layer(x).square().sum(), list(layer.parameters())) for x in inputs]
    errors = []

    def work(i):
        try:
            for _ in range(5):
                with torch.no_grad():
                    assert rel_err(layer(inputs[i]), expected[i]) < 1e-6
                grads = torch.autograd.grad(layer(inputs[i]).square().sum(), list(layer.parameters()))
                assert all(rel_err(g, e) < 1e-5 for g, e in zip(grads, expected_grads[i]))
        except Exception as e:          # reported from the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
