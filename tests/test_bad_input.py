"""Bad inputs raise the right exception type with a message that names the argument."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import tensorpress  # noqa: F401
from _util import random_cores
from tensorpress.decompose import tt_matrix_svd, tt_svd
from tensorpress.nn import TTLinear, balanced_factors
from tensorpress.ops import choose_plan, tt_matmul, tt_matmul_reference, tt_to_dense, validate_tt_cores
from tensorpress.ops.tt import merge_group, step_matrices
from tensorpress.ops.tt_plan import flat_dims


def cores_3():
    return random_cores((3, 4, 2), (2, 5, 3), (3, 4))  # N = 30, M = 24


def _snapshot(*tensors):
    return [t.detach().clone() for t in tensors]


def _unchanged(tensors, snapshot):
    return all(torch.equal(t.detach(), s) for t, s in zip(tensors, snapshot))


# ----------------------------------------------------------------------------- x
@pytest.mark.parametrize("fn", [tt_matmul, tt_matmul_reference])
@pytest.mark.parametrize("shape", [(4, 31), (4, 29), (30, 4), (4, 30, 1), ()])
def test_wrong_last_dim_of_x(fn, shape):
    cores = cores_3()
    x = torch.randn(shape, dtype=torch.float64)
    snap = _snapshot(x, *cores)
    with pytest.raises(ValueError, match=r"^x: .*30"):
        fn(x, cores)
    assert _unchanged([x, *cores], snap)


def test_x_not_a_tensor():
    with pytest.raises(TypeError, match=r"^x: "):
        tt_matmul([[0.0] * 30], cores_3())


def test_ttlinear_wrong_input_dim():
    layer = TTLinear(60, 24, ranks=3, in_factors=(3, 4, 5), out_factors=(2, 3, 4))
    x = torch.randn(5, 61)
    snap = _snapshot(x)
    with pytest.raises(ValueError, match="in_features=60"):
        layer(x)
    assert _unchanged([x], snap)


# ----------------------------------------------------------------------------- ranks
@pytest.mark.parametrize("ranks", [[4, 4], [4, 4, 4, 4], [], (4,)])
def test_ranks_wrong_length(ranks):
    with pytest.raises(ValueError, match=r"^ranks: .*3 bond ranks"):
        TTLinear(1024, 1024, ranks=ranks)


@pytest.mark.parametrize("ranks", [0, -1, [4, 0, 4], (1, 2, -3)])
def test_ranks_below_one(ranks):
    with pytest.raises(ValueError, match=r"^ranks: .*>= 1"):
        TTLinear(1024, 1024, ranks=ranks)


@pytest.mark.parametrize("ranks", ["4", 4.0, None, True, {4, 5, 6}, torch.tensor(4)])
def test_ranks_wrong_type(ranks):
    with pytest.raises(TypeError, match=r"^ranks: "):
        TTLinear(1024, 1024, ranks=ranks)


@pytest.mark.parametrize("ranks", [[4.0, 4, 4], [4, "4", 4], [4, None, 4], [4, True, 4]])
def test_ranks_wrong_element_type(ranks):
    with pytest.raises((TypeError, ValueError), match=r"^ranks: "):
        TTLinear(1024, 1024, ranks=ranks)


@pytest.mark.parametrize("ranks", [[4, 4], 0, "4", 4.5])
def test_from_dense_bad_ranks(ranks):
    lin = nn.Linear(64, 64)
    snap = _snapshot(lin.weight, lin.bias)
    with pytest.raises((TypeError, ValueError), match=r"^ranks: "):
        TTLinear.from_dense(lin, ranks=ranks)
    assert _unchanged([lin.weight, lin.bias], snap)


# ----------------------------------------------------------------------------- cores
def test_cores_rank_mismatch():
    cores = cores_3()
    cores[1] = torch.randn(2, 4, 5, 4, dtype=torch.float64)  # r_left 2 but cores[0] has r_right 3
    x = torch.randn(2, 30, dtype=torch.float64)
    snap = _snapshot(x, *cores)
    for fn in (
        lambda: tt_matmul(x, cores),
        lambda: tt_matmul_reference(x, cores),
        lambda: tt_to_dense(cores),
        lambda: validate_tt_cores(cores),
    ):
        with pytest.raises(ValueError, match=re.escape("cores[1]") + r".*r_left = 3.*got 2"):
            fn()
    assert _unchanged([x, *cores], snap)


@pytest.mark.parametrize("bad", [torch.randn(3, 4, 5), torch.randn(3, 4, 5, 4, 1), torch.randn(20)])
def test_core_wrong_ndim(bad):
    cores = cores_3()
    cores[1] = bad.double()
    x = torch.randn(2, 30, dtype=torch.float64)
    with pytest.raises(ValueError, match=re.escape("cores[1]") + r".*4-d"):
        tt_matmul(x, cores)


@pytest.mark.parametrize("which", ["first", "last"])
def test_boundary_rank_not_one(which):
    if which == "first":
        cores = [torch.randn(2, 3, 2, 3), torch.randn(3, 4, 5, 1)]
    else:
        cores = [torch.randn(1, 3, 2, 3), torch.randn(3, 4, 5, 2)]
    x = torch.randn(2, 10)
    with pytest.raises(ValueError, match=r"^cores: .*boundary ranks"):
        tt_matmul(x, cores)
    with pytest.raises(ValueError, match=r"^cores: .*boundary ranks"):
        tt_to_dense(cores)


@pytest.mark.parametrize("cores", [[], (), None, torch.randn(1, 2, 2, 1), [torch.randn(1, 2, 2, 1), "core"]])
def test_cores_not_a_list_of_tensors(cores):
    with pytest.raises(TypeError, match=r"^cores"):
        tt_matmul(torch.randn(2, 2), cores)


def test_cores_unsupported_dtype():
    cores = [torch.ones(1, 2, 2, 1, dtype=torch.int64)]
    with pytest.raises(TypeError, match=r"^cores: .*dtype"):
        tt_matmul(torch.ones(2, 2, dtype=torch.int64), cores)


# ----------------------------------------------------------------------------- dtype / device
@pytest.mark.parametrize(
    "x_dtype,core_dtype",
    [
        (torch.float32, torch.float64),
        (torch.float64, torch.float32),
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float16),
    ],
)
def test_dtype_mismatch_x_vs_cores(x_dtype, core_dtype):
    cores = [g.to(core_dtype) for g in cores_3()]
    x = torch.randn(3, 30).to(x_dtype)
    snap = _snapshot(x, *cores)
    with pytest.raises(TypeError, match=r"^x: .*dtype"):
        tt_matmul(x, cores)
    assert _unchanged([x, *cores], snap)


def test_dtype_mismatch_between_cores():
    cores = cores_3()
    cores[2] = cores[2].float()
    with pytest.raises(TypeError, match=re.escape("cores[2]") + r".*dtype"):
        tt_matmul(torch.randn(3, 30, dtype=torch.float64), cores)


def test_ttlinear_dtype_mismatch():
    layer = TTLinear(60, 24, ranks=3, in_factors=(3, 4, 5), out_factors=(2, 3, 4))
    with pytest.raises(TypeError, match=r"^x: .*dtype"):
        layer(torch.randn(2, 60, dtype=torch.float64))


def test_device_mismatch_meta_cores():
    cores = [g.to("meta") for g in cores_3()]
    x = torch.randn(3, 30, dtype=torch.float64)
    snap = _snapshot(x)
    with pytest.raises(ValueError, match=r"^x: .*device"):
        tt_matmul(x, cores)
    assert _unchanged([x], snap)


def test_device_mismatch_meta_x():
    cores = cores_3()
    x = torch.empty(3, 30, dtype=torch.float64, device="meta")
    snap = _snapshot(*cores)
    with pytest.raises(ValueError, match=r"^x: .*device"):
        tt_matmul(x, cores)
    assert _unchanged(cores, snap)


def test_device_mismatch_between_cores():
    cores = cores_3()
    cores[1] = cores[1].to("meta")
    with pytest.raises(ValueError, match=re.escape("cores[1]") + r".*device"):
        tt_matmul(torch.randn(3, 30, dtype=torch.float64), cores)


# ----------------------------------------------------------------------------- from_dense
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", ["weight", "bias"])
def test_from_dense_non_finite(bad, where):
    lin = nn.Linear(64, 32)
    with torch.no_grad():
        getattr(lin, where)[3] = bad
    snap = _snapshot(lin.weight, lin.bias)  # compared NaN-safely below
    with pytest.raises(ValueError, match=r"^linear: .*finite"):
        TTLinear.from_dense(lin, ranks=4)
    with pytest.raises(ValueError, match=r"^linear: .*finite"):
        TTLinear.from_dense(lin, rel_error=0.1)
    assert torch.equal(torch.nan_to_num(lin.weight.detach()), torch.nan_to_num(snap[0]))
    assert torch.equal(torch.nan_to_num(lin.bias.detach()), torch.nan_to_num(snap[1]))


def test_from_dense_neither_ranks_nor_rel_error():
    lin = nn.Linear(64, 32)
    with pytest.raises(ValueError, match=r"ranks.*rel_error"):
        TTLinear.from_dense(lin)


def test_from_dense_not_a_linear():
    with pytest.raises(TypeError, match=r"^linear: "):
        TTLinear.from_dense(nn.Conv1d(4, 4, 1), ranks=2)
    with pytest.raises(TypeError, match=r"^linear: "):
        TTLinear.from_dense(torch.randn(4, 4), ranks=2)


@pytest.mark.parametrize("rel_error", [-0.1, 1.0, 2.0, float("nan"), "0.1"])
def test_from_dense_bad_rel_error(rel_error):
    lin = nn.Linear(64, 32)
    with pytest.raises((TypeError, ValueError), match=r"^rel_error: "):
        TTLinear.from_dense(lin, rel_error=rel_error)


# ----------------------------------------------------------------------------- factors
@pytest.mark.parametrize(
    "kw,name",
    [
        ({"in_factors": (4, 8, 8, 8)}, "in_factors"),
        ({"out_factors": (4, 8, 8, 2)}, "out_factors"),
        ({"in_factors": (4, 8, 8, 4), "out_factors": (4, 8, 8, 8)}, "out_factors"),
        ({"in_factors": (32, 32), "out_factors": (4, 8, 8, 4)}, "out_factors"),  # lengths differ
        ({"in_factors": (4, 8, 8, 4.0)}, "in_factors"),
        ({"in_factors": (-4, -8, 8, 4)}, "in_factors"),
        ({"in_factors": (0, 8, 8, 4)}, "in_factors"),
    ],
)
def test_factors_with_wrong_product_or_values(kw, name):
    with pytest.raises(ValueError, match=rf"^{name}: "):
        TTLinear(1024, 1024, ranks=4, **kw)


def test_from_dense_factors_with_wrong_product():
    lin = nn.Linear(64, 32)
    with pytest.raises(ValueError, match=r"^in_factors: "):
        TTLinear.from_dense(lin, ranks=4, in_factors=(4, 4, 2), out_factors=(2, 4, 4))
    with pytest.raises(ValueError, match=r"^out_factors: "):
        TTLinear.from_dense(lin, ranks=4, in_factors=(4, 4, 4), out_factors=(2, 4, 2))


@pytest.mark.parametrize("n,d", [(1021, 2), (13, 3), (7, 2), (12, 4), (8, 4)])
def test_prime_or_too_few_prime_factors(n, d):
    with pytest.raises(ValueError, match=r"^features=" + str(n) + r" cannot be split"):
        balanced_factors(n, d, "features")
    with pytest.raises(ValueError, match=r"^in_features="):
        TTLinear(n, 2**12, ranks=2, out_factors=(2**12 // 2 ** (d - 1),) + (2,) * (d - 1))


@pytest.mark.parametrize(
    "kw", [{"in_features": 0}, {"in_features": -4}, {"in_features": 8.0}, {"out_features": 0}, {"out_features": "8"}]
)
def test_bad_features(kw):
    args = {"in_features": 8, "out_features": 8, "ranks": 2, **kw}
    name = next(iter(kw))
    with pytest.raises(ValueError, match=rf"^{name}: "):
        TTLinear(**args)


# ----------------------------------------------------------------------------- custom op and plan
def _op_args():
    cores = cores_3()
    merged = [merge_group(cores, g) for g in ((0,), (1,), (2,))]
    mats = step_matrices(merged, (0, 1, 2))
    return torch.randn(4, 30, dtype=torch.float64), mats, flat_dims([tuple(g.shape) for g in merged])


def test_custom_op_non_adjacent_order():
    x, mats, dims = _op_args()
    snap = _snapshot(x, *mats)
    with pytest.raises(ValueError, match=r"^order: .*not adjacent"):
        torch.ops.tensorpress.tt_contract(x, mats, dims, [0, 2, 1])
    with pytest.raises(ValueError, match=r"^order: "):
        torch.ops.tensorpress.tt_contract(x, mats, dims, [0, 1])
    with pytest.raises(ValueError, match=r"^order: .*out of range"):
        torch.ops.tensorpress.tt_contract(x, mats, dims, [5, 1, 2])
    assert _unchanged([x, *mats], snap)


def test_custom_op_wrong_mats():
    x, mats, dims = _op_args()
    with pytest.raises(ValueError, match=re.escape("mats[1]") + r": expected shape"):
        torch.ops.tensorpress.tt_contract(
            x, [mats[0], torch.cat([mats[1], mats[1][:, :1]], 1), mats[2]], dims, [0, 1, 2]
        )
    with pytest.raises(ValueError, match=r"^mats: expected 3 step matrices"):
        torch.ops.tensorpress.tt_contract(x, mats[:2], dims, [0, 1, 2])
    with pytest.raises(ValueError, match=re.escape("mats[2]") + r": expected dtype float64"):
        torch.ops.tensorpress.tt_contract(x, [mats[0], mats[1], mats[2].float()], dims, [0, 1, 2])


def test_custom_op_wrong_x():
    x, mats, dims = _op_args()
    with pytest.raises(ValueError, match=r"^x: expected shape \(batch, 30\)"):
        torch.ops.tensorpress.tt_contract(torch.randn(4, 31, dtype=torch.float64), mats, dims, [0, 1, 2])
    with pytest.raises(ValueError, match=r"^x: expected dtype float32 or float64"):
        torch.ops.tensorpress.tt_contract(x.half(), [m.half() for m in mats], dims, [0, 1, 2])


def test_custom_op_bad_core_dims():
    x, mats, dims = _op_args()
    with pytest.raises(ValueError, match=r"^core_dims: "):
        torch.ops.tensorpress.tt_contract(x, mats, dims[:-1], [0, 1, 2])
    bad = list(dims)
    bad[3] = 5  # r_right of core 0 no longer matches r_left of core 1
    with pytest.raises(ValueError, match=r"rank mismatch"):
        torch.ops.tensorpress.tt_contract(x, mats, bad, [0, 1, 2])


def test_choose_plan_bad_shapes():
    with pytest.raises(ValueError, match=r"rank mismatch"):
        choose_plan([(1, 2, 2, 3), (4, 2, 2, 1)], 8)
    with pytest.raises(ValueError, match=r"boundary ranks"):
        choose_plan([(2, 2, 2, 3), (3, 2, 2, 1)], 8)


# ----------------------------------------------------------------------------- decompositions
def test_tt_svd_bad_args_summary():
    t = torch.randn(3, 4, 5, dtype=torch.float64)
    snap = _snapshot(t)
    with pytest.raises(ValueError, match=r"max_rank.*rel_error"):
        tt_svd(t)
    with pytest.raises(TypeError, match=r"^tensor: "):
        tt_svd(torch.ones(3, 4, 5, dtype=torch.int64), max_rank=2)
    with pytest.raises(ValueError, match=r"^max_rank: "):
        tt_svd(t, max_rank=0)
    with pytest.raises(ValueError, match=r"^rel_error: "):
        tt_svd(t, rel_error=1.5)
    assert _unchanged([t], snap)


def test_tt_matrix_svd_bad_factors():
    w = torch.randn(24, 30, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"out_factors, in_factors"):
        tt_matrix_svd(w, (2, 3, 4), (2, 3, 6), max_rank=2)
    with pytest.raises(ValueError, match=r"out_factors, in_factors"):
        tt_matrix_svd(w, (6, 4), (2, 3, 5), max_rank=2)
    with pytest.raises(ValueError, match=r"^weight: "):
        tt_matrix_svd(torch.randn(24), (2, 3, 4), (2, 3, 5), max_rank=2)
