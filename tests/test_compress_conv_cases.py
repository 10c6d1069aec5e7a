"""Conv layers the real world has (issue 28, item 5): non-square, dilated, strided and padded
kernels, 1-D audio-style (k, 1) kernels, grouped and depthwise convs, convs followed by
BatchNorm; on small synthetic models and on the MNIST and Fashion-MNIST CNNs the project ships.

Every conv compress() meets is either replaced by a layer that keeps its stride, padding,
dilation and padding mode (at full rank it computes the dense conv) or kept with the reason in
report.account: never a crash, never a silently different output."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import tensorpress as tp
from tensorpress.compress.structures import ADAPTERS
from tensorpress.nn import TuckerConv2d, conv_paths

F64 = torch.float64


@pytest.fixture(autouse=True)
def small_and_quick():
    """CPConv2d's static routes (timing the routes of every new shape took most of these tests'
    time; they check what is computed, which every route computes alike) and one thread (the
    tensors are tiny: on a busy 2-core machine each op of two threads waited milliseconds)."""
    was, threads = conv_paths.autotune_enabled(), torch.get_num_threads()
    conv_paths.set_autotune(False)
    torch.set_num_threads(1)
    yield
    conv_paths.set_autotune(was)
    torch.set_num_threads(threads)

# name: nn.Conv2d arguments (in -> out channels 6 -> 5); each is one branch of _Branches
GEOMETRIES = {
    "square": dict(kernel_size=3, padding=1),
    "non_square": dict(kernel_size=(3, 5), padding=(1, 2)),
    "dilated": dict(kernel_size=3, dilation=2, padding=2),
    "dilated_h": dict(kernel_size=(3, 3), dilation=(2, 1), padding=(2, 1)),
    "strided": dict(kernel_size=3, stride=2, padding=1),
    "strided_w_valid": dict(kernel_size=3, stride=(1, 2)),
    "same_even": dict(kernel_size=4, padding="same"),            # asymmetric 'same' padding
    "same_dilated": dict(kernel_size=(3, 2), padding="same", dilation=2),
    "reflect": dict(kernel_size=3, padding=1, padding_mode="reflect"),
    "circular": dict(kernel_size=(3, 5), padding=(1, 2), padding_mode="circular"),
    "replicate_dilated": dict(kernel_size=3, padding=2, padding_mode="replicate", dilation=2),
    "audio_k1": dict(kernel_size=(5, 1), padding=(2, 0)),       # a 1-D conv written as a 2-D one
    "audio_k1_strided": dict(kernel_size=(3, 1), stride=(2, 1), dilation=(2, 1)),
    "pointwise": dict(kernel_size=1),
    "no_bias": dict(kernel_size=3, padding=1, bias=False),
}
CP_RANK = 2   # CP-ALS recovers rank-2 kernels of every shape here to ~1e-8 (rank 3 sometimes swamps)


class _Branches(nn.Module):
    """Every geometry as a branch reading the same input, so one compress() call covers all."""

    def __init__(self):
        super().__init__()
        self.branch = nn.ModuleDict({name: nn.Conv2d(6, 5, **kw) for name, kw in GEOMETRIES.items()})

    def forward(self, x):
        return sum(torch.tanh(conv(x)).mean((2, 3)) for conv in self.branch.values())


def _branches(exact_cp_rank: int | None = None) -> nn.Module:
    """The model in float64; with ``exact_cp_rank`` every kernel is a CP tensor of that rank,
    so a CP fit of that rank is exact (CP has no 'full rank' that any kernel reaches)."""
    torch.manual_seed(0)
    model = _Branches().to(F64).eval()
    if exact_cp_rank is not None:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for conv in model.branch.values():
                o, i, kh, kw = conv.weight.shape
                a, b, c, d = (torch.randn(n, exact_cp_rank, generator=g, dtype=F64) for n in (o, i, kh, kw))
                conv.weight.copy_(torch.einsum("or,ir,hr,wr->oihw", a, b, c, d) / exact_cp_rank)
    return model


def _calib(shape=(4, 6, 12, 11), n=2, seed=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=F64) for _ in range(n)]


def _rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("structure, method", [("tucker", "svd"), ("tucker", "whitened"), ("tucker", "activation"),
                                               ("cp", "svd"), ("cp", "whitened"), ("cp", "activation")])
def test_every_geometry_compresses_to_the_same_conv_at_full_rank(structure, method):
    model = _branches(exact_cp_rank=CP_RANK if structure == "cp" else None)
    names = [f"branch.{n}" for n in GEOMETRIES]
    ranks = {n: (5, 6) if structure == "tucker" else CP_RANK for n in names}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # full rank: "no fewer parameters than the dense kernel"
        small, report = tp.compress(model, _calib(), structure=structure, method=method, ranks=ranks, ridge=1e-12)
    assert [a.status for a in report.account] == ["compressed"] * len(GEOMETRIES)
    x = torch.randn(3, 6, 13, 10, generator=torch.Generator().manual_seed(3), dtype=F64)   # odd, unseen size
    for name in names:
        dense, layer = model.get_submodule(name), small.get_submodule(name)
        # the geometry is the dense conv's: the layer computes exactly the conv of its own kernel
        for attr in ("stride", "padding", "dilation", "padding_mode"):
            assert getattr(layer, attr) == getattr(dense, attr), (name, attr)
        with torch.no_grad():
            y, y_hat = dense(x), layer(x)
            assert y_hat.shape == y.shape, name
            assert _rel(y_hat, layer.to_conv()(x)) < 1e-12, name
            # and at full rank that kernel is the dense one
            assert _rel(y_hat, y) < (1e-8 if structure == "tucker" else 1e-6), (name, _rel(y_hat, y))


class _Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, (3, 5), padding=(1, 2), groups=4)
        self.depthwise = nn.Conv2d(8, 16, 3, padding=1, groups=8)    # depth multiplier 2
        self.pointwise = nn.Conv2d(16, 8, 1)

    def forward(self, x):
        for layer in (self.conv, self.grouped, self.depthwise, self.pointwise):
            x = torch.relu(layer(x))
        return x


@pytest.mark.parametrize("structure, method", [("tucker", "activation"), ("cp", "whitened"), ("cp", "svd")])
def test_grouped_and_depthwise_convs_are_kept_with_the_reason(structure, method):
    torch.manual_seed(5)
    model = _Grouped().to(F64).eval()
    small, report = tp.compress(model, _calib((2, 4, 8, 8)), structure=structure, method=method, budget=0.5)
    acc = {a.name: a for a in report.account}
    assert {n: a.status for n, a in acc.items()} == {"conv": "compressed", "grouped": "skipped",
                                                     "depthwise": "skipped", "pointwise": "compressed"}
    assert acc["grouped"].why.startswith(f"grouped conv (groups=4): not supported by {structure}")
    assert acc["depthwise"].why.startswith(f"grouped conv (groups=8): not supported by {structure}")
    assert "depthwise conv" in acc["depthwise"].why and "depthwise" not in acc["grouped"].why
    # kept as they were: the same type, groups and weights
    for name in ("grouped", "depthwise"):
        kept, dense = small.get_submodule(name), model.get_submodule(name)
        assert type(kept) is nn.Conv2d and kept.groups == dense.groups
        assert torch.equal(kept.weight, dense.weight) and torch.equal(kept.bias, dense.bias)
    with pytest.raises(ValueError, match=r"'grouped' is skipped: grouped conv \(groups=4\)"):
        tp.compress(model, _calib((2, 4, 8, 8)), structure=structure, method=method,
                    ranks={"conv": 2, "grouped": 2, "pointwise": 2})


@pytest.mark.parametrize("shape, asked, got", [
    ((16, 12, 1, 1), (3, 2), (2, 2)),     # a 1x1 kernel's Tucker-2 core is a matrix: r_out = r_in
    ((2, 16, 3, 1), (2, 4), (2, 4)),
    ((2, 16, 3, 1), (1, 4), (1, 3)),      # r_in <= r_out * kh * kw
    ((8, 8, 5, 1), (1, 8), (1, 5)),
])
def test_tucker_ranks_are_made_feasible_before_the_fit(shape, asked, got):
    """A 1x1 or (k, 1) kernel bounds each channel rank by the other's times the kernel size:
    the fit used to come back with fewer columns than the layer had room for (a RuntimeError
    inside from_dense, or from compress() at a budget)."""
    torch.manual_seed(6)
    o, i, kh, kw = shape
    conv = nn.Conv2d(i, o, (kh, kw)).to(F64)
    layer = TuckerConv2d.from_dense(conv, asked)
    assert layer.ranks == got
    assert layer.to_dense().shape == conv.weight.shape
    adapter = ADAPTERS["tucker"]
    assert adapter.check_rank("conv", conv, asked) == got
    # the budget rule is charged for the ranks the layer gets, at every budget
    for budget in (0.2, 0.5, 0.9, 1.0):
        rank = adapter.uniform_rank(conv, budget)
        assert tuple(adapter.feasible(conv, *rank)[:2]) == tuple(rank)
    model = nn.Sequential(conv, nn.ReLU()).eval()
    x = _calib((3, i, 7, 4), n=2)
    for budget in (0.5, 0.9):
        small, report = tp.compress(model, x, structure="tucker", method="activation", budget=budget)
        (row,) = report.layers
        assert row.rank == small[0].ranks and row.params_after == sum(p.numel() for p in small[0].parameters())
