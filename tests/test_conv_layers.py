"""CPConv2d and TuckerConv2d: exact equivalence with nn.Conv2d, from_dense, compile, dtypes."""

import pytest
import torch
from torch import nn

from _util import rel_err
from tensorpress.decompose import cp_to_tensor
from tensorpress.nn import CPConv2d, TuckerConv2d

# (kernel, stride, padding, dilation, padding_mode); every case on a non-square input
GEOMETRIES = [
    ((3, 3), 1, 0, 1, "zeros"),
    ((3, 3), 2, 1, 1, "zeros"),
    ((3, 3), 1, "same", 2, "zeros"),
    ((2, 2), 1, "same", 1, "zeros"),  # even kernel: asymmetric 'same' padding
    ((4, 2), 2, 1, (2, 1), "zeros"),  # even, non-square kernel
    ((3, 5), (2, 1), (1, 2), (1, 2), "zeros"),
    ((3, 3), 1, 1, 1, "reflect"),
    ((3, 3), 2, 1, 1, "circular"),
    ((3, 3), 1, "same", 1, "replicate"),
    ((1, 1), 1, 0, 1, "zeros"),
]


def _dense(geom, cin=5, cout=7, bias=True, dtype=torch.float64):
    k, s, p, d, mode = geom
    return nn.Conv2d(cin, cout, k, stride=s, padding=p, dilation=d, bias=bias, padding_mode=mode, dtype=dtype)


def _layer(kind, geom, cin=5, cout=7, bias=True, dtype=torch.float64, rank=4):
    k, s, p, d, mode = geom
    if kind == "cp":
        return CPConv2d(cin, cout, k, rank, stride=s, padding=p, dilation=d, bias=bias, padding_mode=mode, dtype=dtype)
    return TuckerConv2d(
        cin, cout, k, (3, 4), stride=s, padding=p, dilation=d, bias=bias, padding_mode=mode, dtype=dtype
    )


@pytest.mark.parametrize("kind", ["cp", "tucker"])
@pytest.mark.parametrize("geom", GEOMETRIES)
def test_forward_equals_conv_with_to_dense(kind, geom):
    torch.manual_seed(0)
    layer = _layer(kind, geom)
    x = torch.randn(2, 5, 11, 8, dtype=torch.float64)
    ref = layer.to_conv()
    assert torch.equal(ref.weight, layer.to_dense())
    y = layer(x)
    assert y.shape == ref(x).shape
    assert rel_err(y, ref(x)) < 1e-12
    assert rel_err(layer(x[0]), ref(x[0])) < 1e-12  # unbatched input


@pytest.mark.parametrize("geom", GEOMETRIES)
def test_tucker_full_rank_from_dense_reproduces_conv(geom):
    torch.manual_seed(1)
    conv = _dense(geom)
    layer = TuckerConv2d.from_dense(conv, ranks=(7, 5))
    x = torch.randn(2, 5, 11, 8, dtype=torch.float64)
    assert rel_err(layer(x), conv(x)) < 1e-10
    assert rel_err(layer.to_dense(), conv.weight) < 1e-10


@pytest.mark.parametrize("geom", GEOMETRIES[:6])
@pytest.mark.parametrize("method", ["als", "overparam"])
def test_cp_from_dense_at_the_kernels_rank_reproduces_conv(geom, method):
    # a kernel of CP rank 3 (random factors): rank-3 CPConv2d is then exact
    gen = torch.Generator().manual_seed(2)
    conv = _dense(geom)
    kh, kw = conv.kernel_size
    factors = [torch.randn(n, 3, generator=gen, dtype=torch.float64) for n in (7, 5, kh, kw)]
    with torch.no_grad():
        conv.weight.copy_(cp_to_tensor(None, factors))
    kwargs = {"random_state": 0} if method == "overparam" else {}
    layer = CPConv2d.from_dense(conv, rank=3, method=method, **kwargs)
    x = torch.randn(2, 5, 11, 8, dtype=torch.float64)
    assert layer.decomposition.rel_error < 1e-6
    assert rel_err(layer(x), conv(x)) < 1e-6


def test_cp_from_dense_low_rank_error_matches_decomposition():
    torch.manual_seed(3)
    conv = nn.Conv2d(8, 12, 3, padding=1)
    layer = CPConv2d.from_dense(conv, rank=6)
    w_err = rel_err(layer.to_dense(), conv.weight)
    assert abs(w_err - layer.decomposition.rel_error) < 1e-5
    assert 0 < w_err < 1
    assert layer.pointwise_in.dtype == torch.float32
    assert layer.compression_ratio == pytest.approx(12 * 8 * 9 / (6 * (12 + 8 + 3 + 3)))


def test_tucker_truncated_ranks_and_compression():
    torch.manual_seed(4)
    conv = nn.Conv2d(16, 12, 3, padding=1, bias=False)
    layer = TuckerConv2d.from_dense(conv, ranks=(6, 8))
    assert layer.ranks == (6, 8) and layer.bias is None
    assert abs(rel_err(layer.to_dense(), conv.weight) - layer.decomposition.rel_error) < 1e-5
    assert layer.compression_ratio == pytest.approx(12 * 16 * 9 / (8 * 16 + 6 * 8 * 9 + 12 * 6))
    assert "ranks=(6, 8)" in repr(layer) and "x smaller" in repr(layer)
    # ranks above what a mode can carry are capped (out=12 > in*kh*kw is not the case here),
    # with a warning: capped, the layer is larger than the dense conv
    with pytest.warns(UserWarning, match="capped"):
        small = TuckerConv2d.from_dense(nn.Conv2d(2, 30, 1), ranks=30)
    assert small.ranks == (2, 2)


@pytest.mark.parametrize("kind", ["cp", "tucker"])
def test_state_dict_round_trip(kind):
    torch.manual_seed(5)
    geom = ((3, 3), 2, 1, 1, "zeros")
    a, b = _layer(kind, geom, dtype=torch.float32), _layer(kind, geom, dtype=torch.float32)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 5, 9, 10)
    assert torch.equal(a(x), b(x))
    names = set(a.state_dict())
    assert names == (
        {"pointwise_in", "depthwise_h", "depthwise_w", "pointwise_out", "bias"}
        if kind == "cp"
        else {"first", "core", "last", "bias"}
    )


@pytest.mark.parametrize("kind", ["cp", "tucker"])
def test_torch_compile(kind):
    torch.manual_seed(6)
    layer = _layer(kind, ((3, 3), 1, "same", 1, "zeros"), dtype=torch.float32)
    x = torch.randn(2, 5, 8, 6)
    fast = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(fast(x), layer(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["cp", "tucker"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(kind, dtype):
    torch.manual_seed(7)
    geom = ((3, 3), 1, 1, 1, "zeros")
    ref = _layer(kind, geom, dtype=torch.float32)
    half = _layer(kind, geom, dtype=dtype)
    half.load_state_dict({k: v.to(dtype) for k, v in ref.state_dict().items()})
    x = torch.randn(2, 5, 8, 6)
    y = half(x.to(dtype))
    assert y.dtype == dtype
    assert rel_err(y, ref(x)) < (2e-2 if dtype == torch.bfloat16 else 5e-3)
    # from_dense of a half conv gives a half layer
    conv = nn.Conv2d(5, 7, 3, padding=1, dtype=dtype)
    layer = (
        CPConv2d.from_dense(conv, rank=4, n_iter_max=10)
        if kind == "cp"
        else TuckerConv2d.from_dense(conv, ranks=(7, 5))
    )
    assert all(p.dtype == dtype for p in layer.parameters())
    if kind == "tucker":
        assert rel_err(layer(x.to(dtype)), conv(x.to(dtype))) < 3e-2


def test_gradients_flow():
    layer = CPConv2d(3, 4, 3, rank=2, padding=1)
    layer(torch.randn(1, 3, 5, 5)).sum().backward()
    assert all(p.grad is not None for p in layer.parameters())


@pytest.mark.parametrize("cls,arg", [(CPConv2d, 3), (TuckerConv2d, (3, 3))])
def test_bad_input(cls, arg):
    with pytest.raises(ValueError, match="groups"):
        cls(4, 4, 3, arg, groups=2)
    with pytest.raises(ValueError, match="groups"):
        cls.from_dense(nn.Conv2d(4, 4, 3, groups=2), arg)
    with pytest.raises(ValueError, match="rank"):
        cls(4, 4, 3, 0)
    with pytest.raises(ValueError, match="kernel_size"):
        cls(4, 4, 0, arg)
    with pytest.raises(ValueError, match="stride"):
        cls(4, 4, 3, arg, stride=(1, 0))
    with pytest.raises(ValueError, match="padding"):
        cls(4, 4, 3, arg, stride=2, padding="same")
    with pytest.raises(ValueError, match="padding_mode"):
        cls(4, 4, 3, arg, padding_mode="mirror")
    with pytest.raises(ValueError, match="in_channels"):
        cls(0, 4, 3, arg)
    with pytest.raises(TypeError, match="conv"):
        cls.from_dense(nn.Conv1d(4, 4, 3), arg)
    conv = nn.Conv2d(4, 4, 3)
    with torch.no_grad():
        conv.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        cls.from_dense(conv, arg)
    with pytest.raises(ValueError, match="input"):
        cls(4, 4, 3, arg)(torch.randn(1, 3, 5, 5))


def test_cp_bad_method_and_rank():
    conv = nn.Conv2d(4, 4, 3)
    with pytest.raises(ValueError, match="method"):
        CPConv2d.from_dense(conv, 2, method="svd")
    with pytest.raises(ValueError, match="rank"):
        CPConv2d.from_dense(conv, 0)
    with pytest.raises(ValueError, match="rank"):
        CPConv2d(4, 4, 3, rank=True)


def test_cp_conv_compiled_by_inductor_serves_a_second_input_shape():
    """A second input shape makes torch.compile recompile with dynamic sizes; inductor failed on
    the 1x1 stages' expanded batched GEMM there ("cannot determine truth value of Relational")."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = CPConv2d(8, 8, 3, rank=4, padding=1)
    compiled = torch.compile(layer)
    try:
        for shape in [(2, 8, 10, 10), (3, 8, 12, 12)]:
            x = torch.randn(shape)
            torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-6)
    finally:
        torch._dynamo.reset()
