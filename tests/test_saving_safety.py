"""load_compressed on crafted, malformed and foreign files: one clear error (CompressedFileError)
naming the layer and field, raised before any layer is built; round trips for every structure."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import tensorpress
from tensorpress.compress import saving
from tensorpress.compress.saving import FORMAT_VERSION, CompressedFileError, load_compressed, save_compressed


def mlp(d_in=16):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d_in, 32), nn.GELU(), nn.Linear(32, 24), nn.GELU(), nn.Linear(24, 8)).eval()


def cnn():
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1, bias=False)).eval()


def calib_for(model):
    g = torch.Generator().manual_seed(2)
    if isinstance(model[0], nn.Conv2d):
        return [torch.randn(8, 3, 8, 8, generator=g) for _ in range(2)]
    return [torch.randn(64, model[0].in_features, generator=g) for _ in range(2)]


STRUCTURES = {"lowrank": mlp, "tt": mlp, "tucker": cnn, "cp": cnn}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{structure: (dense model, compressed model, path)} written by save_compressed."""
    out = {}
    for structure, make in STRUCTURES.items():
        model = make()
        small, report = tensorpress.compress(model, calib_for(model), structure=structure, method="svd", budget=0.5)
        path = tmp_path_factory.mktemp(structure) / "m.safetensors"
        save_compressed(small, report, path)
        out[structure] = (model, small, path)
    return out


@pytest.fixture
def no_real_build(monkeypatch):
    """Fail the test if load_compressed builds a layer anywhere but on the meta device (where
    nothing is allocated): the crafted files must be refused before that."""
    build = saving._build

    def guarded(kind, kw, device, dtype):
        assert str(device) == "meta", f"built a {kind} on {device} from a file that should have been refused"
        return build(kind, kw, device, dtype)

    monkeypatch.setattr(saving, "_build", guarded)


def parts(path):
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    return load_file(str(path)), meta


def rewrite(src, dst, layers=None, meta=None, tensors=None):
    """A copy of the file src with its layer specs, metadata or tensors edited."""
    t, m = parts(src)
    if layers is not None:
        specs = json.loads(m["tensorpress.layers"])
        layers(specs)
        m["tensorpress.layers"] = json.dumps(specs)
    if meta is not None:
        meta(m)
    if tensors is not None:
        tensors(t)
    save_file(t, str(dst), metadata=m)
    return dst


def first_layer(specs, kind):
    return next(s for s in specs.values() if s["type"] == kind)


@pytest.mark.parametrize("structure", list(STRUCTURES))
def test_round_trip_every_structure(saved, structure):
    model, small, path = saved[structure]
    back = load_compressed(model, path)
    x = calib_for(model)[0][:4]
    with torch.no_grad():
        torch.testing.assert_close(back(x), small(x), rtol=0, atol=0)
    assert parts(path)[1]["tensorpress.format"] == str(FORMAT_VERSION)
    for name, mod in small.named_modules():  # the same layer types at the same names
        assert type(back.get_submodule(name)) is type(mod)


def test_file_without_format_version_loads_as_version_0(saved, tmp_path):
    model, small, path = saved["lowrank"]
    old = rewrite(path, tmp_path / "old.safetensors", meta=lambda m: m.pop("tensorpress.format"))
    x = torch.randn(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(load_compressed(model, old)(x), small(x), rtol=0, atol=0)


def test_newer_or_garbled_format_version_is_refused(saved, tmp_path, no_real_build):
    model, _, path = saved["lowrank"]
    newer = rewrite(path, tmp_path / "n.safetensors", meta=lambda m: m.update({"tensorpress.format": "99"}))
    with pytest.raises(CompressedFileError, match="format 99 was written by a newer tensorpress"):
        load_compressed(model, newer)
    bad = rewrite(path, tmp_path / "b.safetensors", meta=lambda m: m.update({"tensorpress.format": "one"}))
    with pytest.raises(CompressedFileError, match="tensorpress.format: expected a format version"):
        load_compressed(model, bad)


# huge ranks: each would allocate terabytes if the layer were built from the metadata
@pytest.mark.parametrize(
    "structure, edit, message",
    [
        ("lowrank", lambda s: first_layer(s, "LowRankLinear").update(rank=10**12), r"rank: expected an int in \[1, "),
        (
            "tt",
            lambda s: first_layer(s, "TTLinear").update(ranks=[10**12] * len(first_layer(s, "TTLinear")["ranks"])),
            "ranks: bond 0: expected at most",
        ),
        ("tucker", lambda s: first_layer(s, "TuckerConv2d").update(ranks=[10**6, 10**6]), "ranks: expected"),
        ("cp", lambda s: first_layer(s, "CPConv2d").update(rank=10**12), r"rank: expected an int in \[1, "),
    ],
)
def test_huge_ranks_are_refused_before_allocating(saved, tmp_path, no_real_build, structure, edit, message):
    model, _, path = saved[structure]
    crafted = rewrite(path, tmp_path / "c.safetensors", layers=edit)
    assert crafted.stat().st_size < 64 * 1024
    with pytest.raises(CompressedFileError, match=message):
        load_compressed(model, crafted)


def test_rank_within_bounds_but_not_the_files_tensors(saved, tmp_path, no_real_build):
    model, small, path = saved["lowrank"]
    name = next(n for n, m in small.named_modules() if type(m).__name__ == "LowRankLinear")
    rank = small.get_submodule(name).rank

    def edit(specs):
        specs[name]["rank"] = rank + 1 if rank < 8 else rank - 1

    crafted = rewrite(path, tmp_path / "c.safetensors", layers=edit)
    with pytest.raises(CompressedFileError, match=f"tensor '{name}.first': the file has shape"):
        load_compressed(model, crafted)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s["0"].update(rank="4"), "layer '0': rank: expected an int"),
        (lambda s: s["0"].update(rank=4.0), "layer '0': rank: expected an int"),
        (lambda s: s["0"].update(rank=True), "layer '0': rank: expected an int"),
        (lambda s: s["0"].update(bias="yes"), "layer '0': bias: expected true or false"),
        (lambda s: s["0"].update(in_features=None), "layer '0': in_features: expected an int"),
        (lambda s: s["0"].pop("rank"), r"layer '0': fields: .*missing \['rank'\]"),
        (lambda s: s["0"].update(extra=1), r"layer '0': fields: .*unknown \['extra'\]"),
        (lambda s: s["0"].pop("type"), "layer '0': type: expected one of"),
        (lambda s: s["0"].update(type="Bogus"), "layer '0': type: expected one of"),
        (lambda s: s.update({"nope.1": dict(s["0"])}), "layer 'nope.1': name: the model has no such module"),
        (lambda s: s.update({"1": dict(s["0"])}), "layer '1': type: a LowRankLinear replaces an nn.Linear"),
        (lambda s: s.update({"0": [1, 2]}), "layer '0': expected an object of constructor arguments"),
    ],
)
def test_malformed_lowrank_specs(tmp_path, no_real_build, edit, message):
    model = mlp()
    small = nn.Sequential(tensorpress.nn.LowRankLinear.from_dense(model[0], 4), *list(model)[1:])
    path = save_compressed(small, path=tmp_path / "m.safetensors")
    crafted = rewrite(path, tmp_path / "c.safetensors", layers=edit)
    with pytest.raises(CompressedFileError, match=message):
        load_compressed(model, crafted)


@pytest.mark.parametrize(
    "structure, edit, message",
    [
        ("tt", lambda s: first_layer(s, "TTLinear").update(ranks=3), "ranks: expected a list"),
        ("tt", lambda s: first_layer(s, "TTLinear").update(in_factors=[2.0, 8]), "in_factors: expected a list"),
        ("tt", lambda s: first_layer(s, "TTLinear").update(out_factors=[2]), "out_factors: expected a list of"),
        (
            "tt",
            lambda s: first_layer(s, "TTLinear").update(in_factors=[1] * 100),
            "in_factors: expected a list of at most",
        ),
        (
            "tt",
            lambda s: first_layer(s, "TTLinear").update(in_factors=[3] * len(first_layer(s, "TTLinear")["in_factors"])),
            "in_factors: expected factors of in_features",
        ),
        ("tt", lambda s: first_layer(s, "TTLinear").update(ranks=[]), "ranks: expected a list of"),
        (
            "tucker",
            lambda s: first_layer(s, "TuckerConv2d").update(kernel_size=[5, 5]),
            "kernel_size: the file has \\(5, 5\\), the model's nn.Conv2d has \\(3, 3\\)",
        ),
        ("tucker", lambda s: first_layer(s, "TuckerConv2d").update(padding=[-1, 0]), "padding: expected a list"),
        ("tucker", lambda s: first_layer(s, "TuckerConv2d").update(padding={"a": 1}), "padding: expected"),
        ("cp", lambda s: first_layer(s, "CPConv2d").update(stride=[2, 2]), "stride: the file has"),
        ("cp", lambda s: first_layer(s, "CPConv2d").update(padding_mode="reflect"), "padding_mode: the file has"),
        ("cp", lambda s: first_layer(s, "CPConv2d").update(in_channels=4), "in_channels: the file has 4"),
    ],
)
def test_malformed_structured_specs(saved, tmp_path, no_real_build, structure, edit, message):
    model, _, path = saved[structure]
    crafted = rewrite(path, tmp_path / "c.safetensors", layers=edit)
    with pytest.raises(CompressedFileError, match=message):
        load_compressed(model, crafted)


def test_conv_layer_built_with_an_int_padding_round_trips(tmp_path):
    from tensorpress.nn import TuckerConv2d

    model = cnn()
    small = nn.Sequential(TuckerConv2d(3, 8, 3, ranks=(4, 2), padding=1), *list(model)[1:])
    path = save_compressed(small, path=tmp_path / "m.safetensors")
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(load_compressed(model, path)(x), small(x), rtol=0, atol=0)


def test_another_models_file_is_refused(saved, no_real_build):
    _, _, path = saved["lowrank"]  # compressed from an MLP taking 16 inputs
    with pytest.raises(CompressedFileError, match="in_features: the file has 16, the model's nn.Linear has 12"):
        load_compressed(mlp(d_in=12), path)
    _, _, conv_path = saved["cp"]
    with pytest.raises(CompressedFileError, match="layer '0': type: a CPConv2d replaces an nn.Conv2d"):
        load_compressed(mlp(), conv_path)


def test_another_models_dense_tensors_are_refused(tmp_path, no_real_build):
    # the compressed layer matches, a dense layer does not: the header check finds it
    model = mlp()
    small = nn.Sequential(tensorpress.nn.LowRankLinear.from_dense(model[0], 4), *list(model)[1:])
    path = save_compressed(small, path=tmp_path / "m.safetensors")
    wider = mlp()
    wider[4] = nn.Linear(24, 9)
    with pytest.raises(
        CompressedFileError,
        match=r"tensor '4.(weight|bias)': the file has shape \(8,( 24)?\), the "
        r"model expects \(9,( 24)?\)",
    ):
        load_compressed(wider, path)
    unbiased = mlp()
    unbiased[4] = nn.Linear(24, 8, bias=False)
    with pytest.raises(CompressedFileError, match="tensor '4.bias': the model to load has no such tensor"):
        load_compressed(unbiased, path)


def test_tensor_dtype_missing_and_extra_tensors(saved, tmp_path, no_real_build):
    model, _, path = saved["lowrank"]
    with pytest.raises(CompressedFileError, match="dtype F32, the model has torch.float64"):
        load_compressed(mlp().double(), path)
    key = next(iter(parts(path)[0]))
    missing = rewrite(path, tmp_path / "m.safetensors", tensors=lambda t: t.pop(key))
    with pytest.raises(CompressedFileError, match=f"tensor '{key}': missing from the file"):
        load_compressed(model, missing)
    extra = rewrite(path, tmp_path / "e.safetensors", tensors=lambda t: t.update({"stray": torch.zeros(2)}))
    with pytest.raises(CompressedFileError, match="tensor 'stray': the model to load has no such tensor"):
        load_compressed(model, extra)


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "tensorpress.layers: expected JSON"),
        ("[1, 2]", "tensorpress.layers: expected an object"),
        ("[" * 100000 + "]" * 100000, "tensorpress.layers: expected JSON"),
    ],
)
def test_unreadable_layer_metadata(saved, tmp_path, no_real_build, text, message):
    model, _, path = saved["lowrank"]
    crafted = rewrite(path, tmp_path / "c.safetensors", meta=lambda m: m.update({"tensorpress.layers": text}))
    with pytest.raises(CompressedFileError, match=message):
        load_compressed(model, crafted)


def test_paths_that_are_not_files(tmp_path, no_real_build):
    with pytest.raises(CompressedFileError, match="is a directory; expected a .safetensors file"):
        load_compressed(mlp(), tmp_path)
    with pytest.raises(CompressedFileError, match="does not exist .*expected a .safetensors file"):
        load_compressed(mlp(), tmp_path / "absent.safetensors")
    with pytest.raises(TypeError, match="path: expected a str or os.PathLike"):
        load_compressed(mlp(), 3)


def test_truncated_and_foreign_files(saved, tmp_path, no_real_build):
    model, _, path = saved["lowrank"]
    data = path.read_bytes()
    for cut in (4, 64, len(data) // 2, len(data) - 1):
        short = tmp_path / f"t{cut}.safetensors"
        short.write_bytes(data[:cut])
        with pytest.raises(CompressedFileError, match="not a readable safetensors file"):
            load_compressed(model, short)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\xff" * 8 + b"garbage" * 10)
    with pytest.raises(CompressedFileError, match="not a readable safetensors file"):
        load_compressed(model, junk)


def test_error_is_a_value_error_exported_from_compress_saving():
    assert issubclass(CompressedFileError, ValueError)
    assert "CompressedFileError" in saving.__all__
