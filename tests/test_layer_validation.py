"""The layers' constructors validate what they are given, and the eager fast paths survive the
fallbacks for recording and transforms (tests/test_integration_torch.py runs every layer
through PyTorch's machinery)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from _util import rel_err
from tensorpress.linalg import blas
from tensorpress.nn import CPConv2d, LowRankLinear, TTLinear, TuckerConv2d


def test_plain_eager_inference_keeps_the_extension_fast_path(monkeypatch):
    """The fallbacks for recording must not cost the ordinary eager call its fast path."""
    calls = []
    gemm = blas._C.blas_gemm
    monkeypatch.setattr(blas._C, "blas_gemm", lambda *a: (calls.append(1), gemm(*a))[1])
    torch.manual_seed(0)
    layer = CPConv2d(16, 16, 3, rank=16, padding=1)  # 16 x 16 x 256 multiply-adds per 1x1 stage
    x = torch.randn(2, 16, 16, 16)
    with torch.no_grad():
        y = layer(x)
    assert calls and rel_err(y, layer.to_conv()(x)) < 1e-5


def test_tt_no_grad_inference_reuses_its_prepared_matrices(monkeypatch):
    """The TT inference cache still hits for unchanged cores (the value check must not defeat it)."""
    from tensorpress.nn import tt_linear

    torch.manual_seed(0)
    layer, x = TTLinear(256, 256, ranks=4), torch.randn(64, 256)
    prepared = []
    real = tt_linear.prepare_tt
    monkeypatch.setattr(tt_linear, "prepare_tt", lambda *a: prepared.append(1) or real(*a))
    with torch.no_grad():
        for _ in range(3):
            layer(x)
        assert len(prepared) == 1
        layer.cores[1].data.mul_(2)  # a write autograd does not see
        y = layer(x)
    assert len(prepared) == 2
    assert rel_err(y, x.double() @ layer.to_dense().detach().double().T + layer.bias.detach().double()) < 1e-5


# ---------------------------------------------------------------------- ranks and dtypes
def test_cp_rank_above_the_largest_cp_rank_is_refused_before_allocating():
    # a (4, 3, 3, 3) kernel has CP rank at most 4 * 3 * 3 * 3 / 4 = 27
    with pytest.raises(ValueError, match="rank: expected at most 27 for a kernel of shape"):
        CPConv2d(3, 4, 3, rank=10**12)  # 12 TB of factors
    with pytest.raises(ValueError, match="rank: expected at most 27"):
        CPConv2d(3, 4, 3, rank=28)
    with pytest.warns(UserWarning, match="more than the dense"):
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
        TuckerConv2d(4, 4, 3, (4, 4))  # asked for: no cap, no warning
        TuckerConv2d(2, 64, 3, (8, 8))  # capped to (8, 2) but still smaller
        TuckerConv2d.from_dense(nn.Conv2d(8, 8, 3), ranks=(2, 2))


def test_tt_ranks_past_dense_warn_with_the_counts():
    with pytest.warns(
        UserWarning,
        match=r"ranks \(4, 16, 4\): the TT cores hold 544 parameters, more than the "
        r"dense weight's 256",
    ):
        TTLinear(16, 16, ranks=100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TTLinear(16, 16, ranks=2)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128, torch.int64])
def test_non_real_floating_dtypes_are_refused_at_construction(dtype):
    for build in (
        lambda: CPConv2d(3, 4, 3, 2, dtype=dtype),
        lambda: TuckerConv2d(3, 4, 3, 2, dtype=dtype),
        lambda: LowRankLinear(3, 4, 2, dtype=dtype),
        lambda: TTLinear(16, 16, 2, dtype=dtype),
    ):
        with pytest.raises(TypeError, match=f"dtype: expected float32, float64, float16 or bfloat16.*{dtype}"):
            build()
    with pytest.raises(TypeError, match="dtype"):
        CPConv2d.from_dense(nn.Conv2d(3, 4, 3, dtype=torch.complex64), 2)


@pytest.mark.parametrize("x", [torch.tensor(1.0), 3.0, torch.randn(2, 15)], ids=["0-d", "float", "wrong-width"])
def test_tt_input_errors_name_the_expected_shape(x):
    layer = TTLinear(16, 16, ranks=2)
    with pytest.raises((TypeError, ValueError), match="input: expected"):
        layer(x)


def test_cp_rank_past_dense_warns_with_the_counts():
    with pytest.warns(
        UserWarning,
        match=r"rank: 27 gives the CPConv2d 351 factor parameters, more than the dense "
        r"4x3x3x3 kernel's 108; a rank of at most 8 compresses",
    ):
        CPConv2d(3, 4, 3, rank=27)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CPConv2d(3, 4, 3, rank=8)
