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
from tensorpress.compress import CompressedFileError, FoldedBatchNorm, load_compressed, save_compressed
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
    "same_even": dict(kernel_size=4, padding="same"),  # asymmetric 'same' padding
    "same_dilated": dict(kernel_size=(3, 2), padding="same", dilation=2),
    "reflect": dict(kernel_size=3, padding=1, padding_mode="reflect"),
    "circular": dict(kernel_size=(3, 5), padding=(1, 2), padding_mode="circular"),
    "replicate_dilated": dict(kernel_size=3, padding=2, padding_mode="replicate", dilation=2),
    "audio_k1": dict(kernel_size=(5, 1), padding=(2, 0)),  # a 1-D conv written as a 2-D one
    "audio_k1_strided": dict(kernel_size=(3, 1), stride=(2, 1), dilation=(2, 1)),
    "pointwise": dict(kernel_size=1),
    "no_bias": dict(kernel_size=3, padding=1, bias=False),
}
CP_RANK = 2  # CP-ALS recovers rank-2 kernels of every shape here to ~1e-8 (rank 3 sometimes swamps)


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


@pytest.mark.parametrize(
    "structure, method",
    [
        ("tucker", "svd"),
        ("tucker", "whitened"),
        ("tucker", "activation"),
        ("cp", "svd"),
        ("cp", "whitened"),
        ("cp", "activation"),
    ],
)
def test_every_geometry_compresses_to_the_same_conv_at_full_rank(structure, method):
    model = _branches(exact_cp_rank=CP_RANK if structure == "cp" else None)
    names = [f"branch.{n}" for n in GEOMETRIES]
    ranks = {n: (5, 6) if structure == "tucker" else CP_RANK for n in names}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # full rank: "no fewer parameters than the dense kernel"
        small, report = tp.compress(model, _calib(), structure=structure, method=method, ranks=ranks, ridge=1e-12)
    assert [a.status for a in report.account] == ["compressed"] * len(GEOMETRIES)
    x = torch.randn(3, 6, 13, 10, generator=torch.Generator().manual_seed(3), dtype=F64)  # odd, unseen size
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
        self.depthwise = nn.Conv2d(8, 16, 3, padding=1, groups=8)  # depth multiplier 2
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
    assert {n: a.status for n, a in acc.items()} == {
        "conv": "compressed",
        "grouped": "skipped",
        "depthwise": "skipped",
        "pointwise": "compressed",
    }
    assert acc["grouped"].why.startswith(f"grouped conv (groups=4): not supported by {structure}")
    assert acc["depthwise"].why.startswith(f"grouped conv (groups=8): not supported by {structure}")
    assert "depthwise conv" in acc["depthwise"].why and "depthwise" not in acc["grouped"].why
    # kept as they were: the same type, groups and weights
    for name in ("grouped", "depthwise"):
        kept, dense = small.get_submodule(name), model.get_submodule(name)
        assert type(kept) is nn.Conv2d and kept.groups == dense.groups
        assert torch.equal(kept.weight, dense.weight) and torch.equal(kept.bias, dense.bias)
    with pytest.raises(ValueError, match=r"'grouped' is skipped: grouped conv \(groups=4\)"):
        tp.compress(
            model,
            _calib((2, 4, 8, 8)),
            structure=structure,
            method=method,
            ranks={"conv": 2, "grouped": 2, "pointwise": 2},
        )


@pytest.mark.parametrize(
    "shape, asked, got",
    [
        ((16, 12, 1, 1), (3, 2), (2, 2)),  # a 1x1 kernel's Tucker-2 core is a matrix: r_out = r_in
        ((2, 16, 3, 1), (2, 4), (2, 4)),
        ((2, 16, 3, 1), (1, 4), (1, 3)),  # r_in <= r_out * kh * kw
        ((8, 8, 5, 1), (1, 8), (1, 5)),
    ],
)
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


# ---------------------------------------------------------------------------- BatchNorm folding
def _set_cp_kernel(conv: nn.Conv2d, rank: int, g: torch.Generator) -> None:
    """Give ``conv`` a kernel of CP rank ``rank`` (folding a BatchNorm keeps the rank: it
    scales the output factor), so a CP fit of that rank is exact."""
    o, i, kh, kw = conv.weight.shape
    a, b, c, d = (torch.randn(n, rank, generator=g, dtype=conv.weight.dtype) for n in (o, i, kh, kw))
    with torch.no_grad():
        conv.weight.copy_(torch.einsum("or,ir,hr,wr->oihw", a, b, c, d) / rank)


def _bn(channels: int, g: torch.Generator, **kw) -> nn.BatchNorm2d:
    """A BatchNorm2d with statistics and uneven scales as a trained one has."""
    bn = nn.BatchNorm2d(channels, **kw)
    if bn.running_mean is not None:
        with torch.no_grad():
            bn.running_mean.copy_(torch.randn(channels, generator=g))
            bn.running_var.copy_(0.2 + 3 * torch.rand(channels, generator=g))
            bn.weight.copy_(torch.exp(2 * torch.randn(channels, generator=g)))
            bn.bias.copy_(torch.randn(channels, generator=g))
    return bn


class _Block(nn.Module):
    """A ResNet-style block: its BatchNorm follows its conv in a custom forward, not in a Sequential."""

    def __init__(self, g):
        super().__init__()
        self.conv1 = nn.Conv2d(8, 8, (3, 1), padding=(1, 0), bias=False)
        self.bn1 = _bn(8, g)

    def forward(self, x):
        return torch.relu(self.bn1(self.conv1(x))) + x


class _Reused(nn.Module):
    """The conv's output goes to the BatchNorm and past it: folding would change the sum."""

    def __init__(self, g):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = _bn(8, g)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def _bn_model(exact_cp_rank: int | None = None, seed: int = 5) -> nn.Module:
    """Conv -> BatchNorm in a Sequential, in a ResNet-style block ((3, 1) kernel) and strided
    and dilated. (With seed 7 CP-ALS stalls at 2.6e-3 on the block's rank-2 (3, 1) kernel.)"""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = (
        nn.Sequential(
            nn.Conv2d(3, 8, (3, 5), padding=(1, 2), bias=False),
            _bn(8, g),
            nn.ReLU(),
            _Block(g),
            nn.Conv2d(8, 6, 3, stride=2, dilation=2, padding=2),
            _bn(6, g),
        )
        .to(F64)
        .eval()
    )
    if exact_cp_rank is not None:
        for conv in (model[0], model[3].conv1, model[4]):
            _set_cp_kernel(conv, exact_cp_rank, g)
    return model


FULL = {"tucker": {"0": (8, 3), "3.conv1": (8, 8), "4": (6, 8)}, "cp": {"0": CP_RANK, "3.conv1": CP_RANK, "4": CP_RANK}}


@pytest.mark.parametrize("structure, method", [("tucker", "activation"), ("tucker", "svd"), ("cp", "whitened")])
def test_batchnorm_folded_into_its_conv_leaves_the_outputs_as_they_were(structure, method):
    model = _bn_model(CP_RANK if structure == "cp" else None)
    before = [p.clone() for p in model.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # full rank
        small, report = tp.compress(
            model,
            _calib((4, 3, 8, 8)),
            structure=structure,
            method=method,
            ranks=FULL[structure],
            ridge=1e-12,
            fold_batchnorm=True,
        )
    # found in a Sequential and in a custom forward (ResNet's bn1(conv1(x)))
    assert report.folded_batchnorm == {"1": "0", "3.bn1": "3.conv1", "5": "4"}
    for bn, conv in report.folded_batchnorm.items():
        marker = small.get_submodule(bn)
        assert isinstance(marker, FoldedBatchNorm) and isinstance(marker, nn.Identity)
        assert marker.conv == conv and f"folded into {conv!r}" in repr(small)
        assert f"'{bn}' (BatchNorm) folded into it before the fit" in {a.name: a.why for a in report.account}[conv]
    assert "BatchNorm folded into the conv before it" in str(report) and "3.bn1 -> 3.conv1" in str(report)
    x = torch.randn(2, 3, 9, 7, generator=torch.Generator().manual_seed(8), dtype=F64)
    with torch.no_grad():
        assert _rel(small(x), model(x)) < (1e-8 if structure == "tucker" else 1e-6)
    # the user's model is as it was: BatchNorms in place, parameters and modes unchanged
    assert type(model[1]) is nn.BatchNorm2d and not model.training
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert report.model_params_before == sum(p.numel() for p in model.parameters())


def test_folding_lets_the_fit_weigh_channels_as_the_batchnorm_does():
    """The reason to fold: a BatchNorm's uneven scales amplify the error of some output
    channels; the fit of the unfolded conv does not know which."""
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    model = (
        nn.Sequential(
            nn.Conv2d(8, 16, 3, padding=1, bias=False),
            _bn(16, g),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1, bias=False),
            _bn(16, g),
            nn.ReLU(),
        )
        .to(F64)
        .eval()
    )
    calib = [torch.randn(8, 8, 10, 10, generator=g, dtype=F64) for _ in range(3)]
    x = torch.randn(8, 8, 10, 10, generator=g, dtype=F64)
    for structure in ("tucker", "cp"):
        err = {}
        for fold in (False, True):
            small, _ = tp.compress(
                model, calib, structure=structure, method="activation", budget=0.3, fold_batchnorm=fold
            )
            with torch.no_grad():
                err[fold] = _rel(small(x), model(x))
        assert err[True] < 0.8 * err[False], (structure, err)  # measured: 0.45 vs 0.71, 0.07 vs 0.55-0.72


def test_batchnorms_that_cannot_be_folded_stay_with_the_reason():
    g = torch.Generator().manual_seed(9)
    torch.manual_seed(9)
    model = (
        nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            _bn(8, g),  # stem: skipped
            _Reused(g),  # output used twice
            nn.Conv2d(8, 8, 3, padding=1),
            _bn(8, g, track_running_stats=False),  # batch statistics
            nn.Conv2d(8, 8, 1),
            _bn(8, g),  # excluded
            nn.Conv2d(8, 4, 3, padding=1),
            _bn(4, g),
        )
        .to(F64)
        .eval()
    )  # folded
    calib = _calib((4, 1, 6, 6))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small, report = tp.compress(
            model,
            calib,
            structure="tucker",
            method="whitened",
            exclude=["5"],
            ridge=1e-12,
            ranks={"2.conv": (8, 8), "3": (8, 8), "7": (4, 8)},
            fold_batchnorm=True,
        )
    assert report.folded_batchnorm == {"8": "7"}
    notes = "\n".join(report.notes)
    assert "BatchNorm2d '1' after conv '0' not folded: the conv is not compressed (skipped: one input channel" in notes
    assert "'2.bn' after conv '2.conv' not folded: folding it changed the model's output on calib[0]" in notes
    assert "'4' after conv '3' not folded: it normalizes by batch statistics (track_running_stats=False)" in notes
    assert "'6' after conv '5' not folded: the conv is not compressed (excluded: matches exclude pattern '5')" in notes
    for name in ("1", "2.bn", "4", "6"):
        assert type(small.get_submodule(name)) is nn.BatchNorm2d, name
    x = torch.randn(3, 1, 7, 5, generator=g, dtype=F64)
    with torch.no_grad():
        assert _rel(small(x), model(x)) < 1e-8


def test_without_calibration_batches_pairs_are_found_side_by_side_in_a_sequential():
    model = _bn_model()
    small, report = tp.compress(
        model, None, structure="tucker", method="svd", ranks=FULL["tucker"], fold_batchnorm=True
    )
    assert report.folded_batchnorm == {"1": "0", "5": "4"}  # not the block's: no pass to see its forward
    assert type(small[3].bn1) is nn.BatchNorm2d
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(10), dtype=F64)
    with torch.no_grad():
        assert _rel(small(x), model(x)) < 1e-8


def test_folding_is_opt_in_and_refuses_batchnorms_in_training_mode():
    model = _bn_model()
    calib = _calib((2, 3, 8, 8))
    small, report = tp.compress(model, calib, structure="tucker", method="whitened", budget=0.5)
    assert report.folded_batchnorm == {} and type(small[1]) is nn.BatchNorm2d
    with pytest.raises(TypeError, match="fold_batchnorm: expected True or False, got 'yes'"):
        tp.compress(model, calib, structure="tucker", fold_batchnorm="yes")
    model.train()
    with pytest.raises(
        ValueError,
        match=r"fold_batchnorm: BatchNorm2d '1' \(after conv '0'\) is in training mode.*"
        r"running statistics; call model.eval\(\) first",
    ):
        tp.compress(model, calib, structure="tucker", method="whitened", budget=0.5, fold_batchnorm=True)
    assert model.training and model[1].training  # left as it was
    model[3].bn1.eval()  # only the BatchNorms to fold must be in eval mode
    model[1].eval()
    model[5].eval()
    _, report = tp.compress(model, calib, structure="tucker", method="whitened", budget=0.5, fold_batchnorm=True)
    assert set(report.folded_batchnorm) == {"1", "3.bn1", "5"}


def test_a_folded_model_saves_and_loads_into_the_dense_architecture(tmp_path):
    model = _bn_model()
    # budget 0.9 with the rank rule keeps conv '0' dense: it keeps the bias the fold gave it
    small, report = tp.compress(
        model,
        _calib((4, 3, 8, 8), n=3),
        structure="tucker",
        method="activation",
        budget=0.9,
        rank_rule="optimism",
        fold_batchnorm=True,
    )
    statuses = {a.name: a.status for a in report.account}
    assert statuses["0"] == "kept dense" and model[0].bias is None and small[0].bias is not None
    path = save_compressed(small, report, tmp_path / "m.safetensors")
    back = load_compressed(_bn_model(), path)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(11), dtype=F64)
    with torch.no_grad():
        assert torch.equal(back(x), small(x))
    assert isinstance(back[1], FoldedBatchNorm) and back[1].conv == "0"
    other = _bn_model()
    other[1] = nn.ReLU()  # a file for another model: checked before anything loads
    with pytest.raises(
        CompressedFileError,
        match=r"layer '1': type: a FoldedBatchNorm replaces a BatchNorm, but "
        r"the model has a ReLU there",
    ):
        load_compressed(other, path)


# ---------------------------------------------------------------------------- the shipped CNNs
def _fashion_cnn():
    from tensorpress.zoo import fashion, mnist

    if (mnist.cache_dir() / fashion.CACHE_NAME).is_file():
        return fashion.load_fashion_cnn(progress=False)
    # not trained here yet (3 epochs take minutes): the same network, trained briefly (2.5 s on
    # one thread; two took 9 s on a busy 2-core machine)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fashion.train_fashion_cnn(epochs=1, progress=False, n_train=3000)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=["mnist-cnn", "fashion-cnn"])
def shipped(request):
    """(name, the CNN in eval mode, 628 normalized test images: 128 to calibrate, 500 to check)."""
    from tensorpress.zoo import mnist

    if request.param == "mnist-cnn":
        from test_zoo_mnist import _digits

        images = _digits()[0]
        model = mnist.load_mnist_cnn()
    else:
        try:
            images = mnist.fashion_mnist("test")[0]
        except mnist.DataUnavailable as err:
            pytest.skip(f"dataset-fashion-mnist unavailable: {err}")
        model = _fashion_cnn()
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:628]
    return request.param, model.eval(), images[order]


def _agreement(a, b, x) -> float:
    with torch.no_grad():
        return (a(x).argmax(1) == b(x).argmax(1)).float().mean().item()


@pytest.mark.parametrize("structure", ["tucker", "cp"])
def test_shipped_cnns_compress_with_every_conv_accounted_for(shipped, structure):
    _, model, images = shipped
    calib, held_out = list(images[:128].split(64)), images[128:]
    small, report = tp.compress(model, calib, structure=structure, method="activation", budget=0.5, fold_batchnorm=True)
    acc = {a.name: a for a in report.account}
    assert {n: a.status for n, a in acc.items()} == {
        "features.0": "skipped",
        "features.3": "compressed",
        "classifier.0": "skipped",
        "classifier.2": "skipped",
    }
    assert "one input channel" in acc["features.0"].why and acc["features.3"].why.startswith(f"{structure} rank")
    # no BatchNorm in these CNNs: folding asked for, nothing to fold, and the report says so
    assert report.folded_batchnorm == {} and any("nothing folded" in n for n in report.notes)
    assert _agreement(small, model, held_out) > 0.95  # measured: 0.98-0.99 (half the conv's parameters)


def _with_batchnorm(model: nn.Module, images: torch.Tensor) -> nn.Module:
    """The CNN with a BatchNorm2d after each conv, its statistics those of ``images`` and its
    scales uneven (the network of a user who trained with BatchNorm)."""
    import copy

    g = torch.Generator().manual_seed(12)
    f = copy.deepcopy(model.features)
    model = copy.deepcopy(model)
    model.features = nn.Sequential(
        f[0], nn.BatchNorm2d(32, momentum=None), f[1], f[2], f[3], nn.BatchNorm2d(64, momentum=None), f[4], f[5]
    )
    model.train()
    with torch.no_grad():
        model(images)  # momentum=None: the running statistics are these images' own
        for bn in (model.features[1], model.features[5]):
            bn.weight.copy_(torch.exp(0.5 * torch.randn(bn.num_features, generator=g)))
            bn.bias.copy_(0.1 * torch.randn(bn.num_features, generator=g))
    return model.eval()


def test_shipped_cnns_with_batchnorm_fold_it_and_keep_their_outputs(shipped):
    _, model, images = shipped
    model = _with_batchnorm(model, images[:128])
    calib, held_out = list(images[:128].split(64)), images[128:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # full rank: no fewer parameters than the dense kernel
        small, report = tp.compress(
            model,
            calib,
            structure="tucker",
            method="activation",
            ranks={"features.4": 64},
            ridge=1e-12,
            fold_batchnorm=True,
        )
    assert report.folded_batchnorm == {"features.5": "features.4"}
    assert any(
        "'features.1' after conv 'features.0' not folded: the conv is not compressed (skipped: one input channel" in n
        for n in report.notes
    )
    assert isinstance(small.features[5], FoldedBatchNorm) and type(small.features[1]) is nn.BatchNorm2d
    with torch.no_grad():
        assert _rel(small(held_out), model(held_out)) < 1e-4  # float32 rounding
    # and at half the conv's parameters, folded, the predictions hold
    small, report = tp.compress(model, calib, structure="tucker", method="activation", budget=0.5, fold_batchnorm=True)
    assert report.folded_batchnorm == {"features.5": "features.4"}
    assert _agreement(small, model, held_out) > 0.95


def test_the_cli_passes_fold_batchnorm_to_every_compress_call(monkeypatch, tmp_path, capsys):
    from tensorpress import cli
    from tensorpress.cli import compress_job as job

    with pytest.raises(SystemExit):
        cli.main(["compress", "--help"])
    assert "--fold-batchnorm" in capsys.readouterr().out
    configs = []
    monkeypatch.setattr(job, "run_job", configs.append)
    assert cli.main(["compress", "--model", "mnist-cnn", "--fold-batchnorm"]) == 0
    assert cli.main(["compress", "--model", "mnist-cnn"]) == 0
    assert [c.fold_batchnorm for c in configs] == [True, False]
    monkeypatch.undo()

    class Stop(Exception):
        pass

    seen = []

    def fake_compress(model, calib, **kw):
        seen.append(kw["fold_batchnorm"])
        if len(seen) == 2:  # the main run and the first of the sweep
            raise Stop
        return model, tp.compress(model, calib, structure="tucker", method="svd", budget=0.5)[1]

    monkeypatch.setattr(job, "compress", fake_compress)
    with pytest.raises(Stop):
        job.run_job(
            job.JobConfig(
                model="mnist-cnn",
                structure="tucker",
                n_calib=8,
                n_eval=8,
                sweep=(0.5,),
                compare=("svd",),
                out=str(tmp_path),
                progress=False,
                fold_batchnorm=True,
            )
        )
    assert seen == [True, True]


def _identity_conv(channels: int, groups: int = 1, **kw) -> nn.Conv2d:
    """A channels -> channels conv that passes its input through (a 1 at the kernel's centre for
    each channel), so inserted into a trained CNN it leaves the predictions as they were."""
    conv = nn.Conv2d(channels, channels, groups=groups, **kw)
    kh, kw_ = conv.kernel_size
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
        per = channels // groups
        for o in range(channels):
            conv.weight[o, o % per, kh // 2, kw_ // 2] = 1.0
    return conv


def test_shipped_cnns_with_every_conv_kind_inserted(shipped):
    """The real networks with a depthwise, a grouped, a non-square dilated and a (k, 1) conv
    after their second conv (each passing its input through): the grouped ones are kept with
    the reason, the others compressed; at full rank the predictions are the CNN's own."""
    import copy

    _, model, images = shipped
    model = copy.deepcopy(model)
    model.features = nn.Sequential(
        *model.features,
        _identity_conv(64, groups=64, kernel_size=3, padding=1),
        _identity_conv(64, groups=4, kernel_size=1),
        _identity_conv(64, kernel_size=(3, 5), dilation=(1, 2), padding=(1, 4)),
        _identity_conv(64, kernel_size=(5, 1), padding=(2, 0)),
    ).eval()
    calib, held_out = list(images[:128].split(64)), images[128:]
    full = {"features.3": (64, 32), "features.8": (64, 64), "features.9": (64, 64)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # full rank: no fewer parameters than the dense kernel
        small, report = tp.compress(model, calib, structure="tucker", method="whitened", ranks=full, ridge=1e-12)
    acc = {a.name: a for a in report.account}
    assert acc["features.6"].why.startswith("grouped conv (groups=64): not supported by tucker")
    assert "depthwise conv" in acc["features.6"].why
    assert acc["features.7"].why.startswith("grouped conv (groups=4): not supported by tucker")
    assert [acc[f"features.{i}"].status for i in (0, 3, 6, 7, 8, 9)] == [
        "skipped",
        "compressed",
        "skipped",
        "skipped",
        "compressed",
        "compressed",
    ]
    with torch.no_grad():
        assert _rel(small(held_out), model(held_out)) < 1e-4
    # and CP at a budget runs on the same kinds, accounting for every conv (weights only: the
    # data-aware CP fits of these kinds are checked above, 3 s more here)
    _, report = tp.compress(model, calib, structure="cp", method="svd", budget=0.5)
    assert [a.status for a in report.account][:6] == [
        "skipped",
        "compressed",
        "skipped",
        "skipped",
        "compressed",
        "compressed",
    ]
