"""CPConv2d's speed paths (GEMM 1x1 stages, fused depthwise kernel) against the general path
(F.conv2d 1x1 stages, two 1-D depthwise convs) and the dense conv, on the same inputs."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from _util import rel_err
from tensorpress.nn import CPConv2d, conv_paths, cp_conv2d

# (kernel, stride, padding, dilation, padding_mode); kernels on both sides of MAX_FUSED_DEPTHWISE
GEOMETRIES = [
    ((3, 3), 1, 1, 1, "zeros"),
    ((3, 3), 2, 0, 1, "zeros"),
    ((2, 2), 1, "same", 1, "zeros"),  # asymmetric 'same' padding (explicit pad)
    ((4, 2), (2, 1), 1, (2, 1), "zeros"),
    ((3, 5), (1, 2), (1, 2), (1, 2), "zeros"),
    ((3, 3), 2, 1, 1, "reflect"),
    ((3, 3), 1, "same", 2, "circular"),
    ((1, 3), 1, (0, 1), 1, "replicate"),
    ((7, 7), 1, 3, 1, "zeros"),  # largest fused kernel
    ((9, 3), (1, 2), (4, 1), 1, "zeros"),  # beyond it: the separable path
    ((1, 1), 2, 0, 1, "zeros"),
]


def _layer(geom, cin=5, cout=7, rank=4, bias=True, dtype=torch.float64):
    k, s, p, d, mode = geom
    torch.manual_seed(0)
    return CPConv2d(cin, cout, k, rank, stride=s, padding=p, dilation=d, bias=bias, padding_mode=mode, dtype=dtype)


def _general_forward(layer, x):
    """The four-convolution forward the speed paths must reproduce (no GEMMs, no fused kernel)."""
    h = F.conv2d(x, layer.pointwise_in)
    sym = cp_conv2d.symmetric_zero_padding(layer._pad, layer.padding_mode)
    if sym is None:
        h = cp_conv2d.apply_padding(h, layer._pad, layer.padding_mode)
        sym = (0, 0)
    h = layer._depthwise_separable(h, sym)
    return F.conv2d(h, layer.pointwise_out, layer.bias)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("geom", GEOMETRIES)
def test_fast_path_equals_general_path_and_dense(geom, bias):
    layer = _layer(geom, bias=bias)
    x = torch.randn(3, 5, 13, 10, dtype=torch.float64)
    ref = _general_forward(layer, x)
    y = layer(x)
    assert y.shape == ref.shape and y.is_contiguous()
    assert rel_err(y, ref) < 1e-12
    assert rel_err(y, layer.to_conv()(x)) < 1e-12
    # channels_last input: the 1x1 stages take F.conv2d, same result
    assert rel_err(layer(x.to(memory_format=torch.channels_last)), ref) < 1e-12
    # a strided (non-contiguous) view as input
    wide = torch.randn(3, 10, 13, 10, dtype=torch.float64)[:, ::2]
    assert rel_err(layer(wide), _general_forward(layer, wide)) < 1e-12


def _all_routes(layer, x):
    """Every combination of the stages' routes this layer and input may take."""
    return [
        cp_conv2d.Routes(a, d, b)
        for a in cp_conv2d.pointwise_candidates(x)
        for d in cp_conv2d.depthwise_candidates(layer.kernel_size)
        for b in ("gemm", "conv")
    ]


@pytest.mark.parametrize("geom", GEOMETRIES)
def test_every_route_equals_the_dense_conv(geom):
    layer = _layer(geom)
    x = torch.randn(3, 5, 12, 11, dtype=torch.float64)
    dense = layer.to_conv()(x)
    routes = _all_routes(layer, x)
    assert len(routes) == (8 if max(layer.kernel_size) <= cp_conv2d.MAX_FUSED_DEPTHWISE else 4)
    for r in routes:
        assert rel_err(layer.forward_routes(x, r), dense) < 1e-12, r


def test_every_route_has_the_general_paths_gradients():
    layer = _layer(((3, 3), 2, 1, 1, "zeros"))
    x = torch.randn(2, 5, 9, 8, dtype=torch.float64, requires_grad=True)
    g = torch.randn_like(layer(x))
    ref = torch.autograd.grad((_general_forward(layer, x) * g).sum(), [x, *layer.parameters()])
    for r in _all_routes(layer, x):
        grads = torch.autograd.grad((layer.forward_routes(x, r) * g).sum(), [x, *layer.parameters()])
        for a, b in zip(grads, ref):
            assert rel_err(a, b) < 1e-12, r


@pytest.mark.parametrize("geom", GEOMETRIES[:2] + GEOMETRIES[-2:])
def test_static_routes_follow_max_fused_depthwise(geom, monkeypatch):
    monkeypatch.setitem(conv_paths._ENABLED, "on", False)
    layer = _layer(geom)
    x = torch.randn(2, 5, 12, 11, dtype=torch.float64)
    fused = layer(x)
    monkeypatch.setattr(cp_conv2d, "MAX_FUSED_DEPTHWISE", 0)  # every kernel -> separable
    assert layer.routes(x).depthwise == "separable"
    separable = layer(x)
    monkeypatch.setattr(cp_conv2d, "MAX_FUSED_DEPTHWISE", 99)  # every kernel -> fused
    assert layer.routes(x) == ("gemm", "fused", "gemm")
    all_fused = layer(x)
    assert rel_err(fused, separable) < 1e-12
    assert rel_err(all_fused, separable) < 1e-12


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("bias", [True, False])
def test_pointwise_conv_matches_conv2d(memory_format, bias):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 6, 5, 3, dtype=torch.float64, generator=gen).to(memory_format=memory_format)
    w = torch.randn(9, 6, 1, 1, dtype=torch.float64, generator=gen)
    b = torch.randn(9, dtype=torch.float64, generator=gen) if bias else None
    y = cp_conv2d.pointwise_conv(x, w, b)
    assert y.shape == (4, 9, 5, 3)
    assert rel_err(y, F.conv2d(x, w, b)) < 1e-13
    empty = cp_conv2d.pointwise_conv(x[:0], w, b)  # empty batch
    assert empty.shape == (0, 9, 5, 3)


def test_gradients_match_general_path():
    layer = _layer(((3, 3), 2, 1, 1, "zeros"))
    x = torch.randn(2, 5, 9, 8, dtype=torch.float64, requires_grad=True)
    g = torch.randn_like(layer(x))
    grads = torch.autograd.grad((layer(x) * g).sum(), [x, *layer.parameters()])
    ref = torch.autograd.grad((_general_forward(layer, x) * g).sum(), [x, *layer.parameters()])
    for a, b in zip(grads, ref):
        assert rel_err(a, b) < 1e-12
    small = CPConv2d(2, 3, 3, 2, padding=1, dtype=torch.float64)
    assert torch.autograd.gradcheck(small, (torch.randn(1, 2, 4, 5, dtype=torch.float64, requires_grad=True),))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_fast_path_close_to_float64(dtype):
    layer = _layer(((3, 3), 1, 1, 1, "zeros"), cin=16, cout=16, rank=8)
    x = torch.randn(2, 16, 10, 10, dtype=torch.float64)
    half = _layer(((3, 3), 1, 1, 1, "zeros"), cin=16, cout=16, rank=8, dtype=dtype)
    half.load_state_dict({k: v.to(dtype) for k, v in layer.state_dict().items()})
    y = half(x.to(dtype))
    assert y.dtype == dtype
    assert rel_err(y, layer(x)) < (2e-2 if dtype == torch.bfloat16 else 5e-3)


def test_full_rank_from_dense_still_reproduces_conv():
    # a kernel of exact CP rank 3: rank-3 from_dense must reproduce the dense conv through the fast path
    gen = torch.Generator().manual_seed(2)
    conv = nn.Conv2d(5, 7, 3, stride=2, padding=1, dtype=torch.float64)
    factors = [torch.randn(n, 3, generator=gen, dtype=torch.float64) for n in (7, 5, 3, 3)]
    with torch.no_grad():
        conv.weight.copy_(torch.einsum("or,ir,hr,wr->oihw", *factors))
    layer = CPConv2d.from_dense(conv, rank=3)
    x = torch.randn(2, 5, 11, 9, dtype=torch.float64)
    assert rel_err(layer(x), conv(x)) < 1e-6
