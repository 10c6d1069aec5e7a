"""Saving a compressed model and rebuilding it from the original architecture.

The file is a safetensors state_dict whose metadata records which layers were replaced by
what ({"name": {"type": "LowRankLinear" | "TTLinear" | "TuckerConv2d" | "CPConv2d", and the
constructor arguments}}) and the format version, so `load_compressed(dense_model, path)` can
swap the same layers in and load the weights. A BatchNorm that compress(fold_batchnorm=True)
folded into its conv is recorded as {"type": "FoldedBatchNorm", "conv": name, "num_features"}:
the loaded model has the identity in its place (and its conv, if kept dense, the folded bias).

Loading checks the whole file before it allocates anything: the metadata against a schema
and against the dense model (each layer's name, type, sizes, geometry and ranks, each rank
within what the layer's shape allows), then every tensor's shape and dtype in the
safetensors header (read without loading a tensor) against the model it would build. A file
that fails any check raises `CompressedFileError` naming the layer and field.
"""

from __future__ import annotations

import builtins
import copy
import json
import math
import os
import re
import warnings
from typing import cast

import torch
from torch import nn

from tensorpress._validate import is_int
from tensorpress.compress.batchnorm import FoldedBatchNorm
from tensorpress.nn.cp_conv2d import CPConv2d
from tensorpress.nn.lowrank_linear import LowRankLinear
from tensorpress.nn.tt_linear import TTLinear
from tensorpress.nn.tucker_conv2d import TuckerConv2d

__all__ = ["CompressedFileError", "FORMAT_VERSION", "compressed_layers", "load_compressed", "save_compressed"]

_KEY = "tensorpress.layers"
_FORMAT_KEY = "tensorpress.format"
# 1: the layers' constructor arguments as below, written with the version; files without
# it (version 0, written before the version existed) have the same schema and load too
FORMAT_VERSION = 1
# more cores than this would need factors of 1: no file written by save_compressed has them
MAX_TT_CORES = 64
_CLASSES = {
    "LowRankLinear": LowRankLinear,
    "TTLinear": TTLinear,
    "TuckerConv2d": TuckerConv2d,
    "CPConv2d": CPConv2d,
    "FoldedBatchNorm": FoldedBatchNorm,
}
_LINEAR_FIELDS = ("in_features", "out_features", "bias")
_CONV_FIELDS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "padding_mode", "bias")
_FIELDS = {
    "LowRankLinear": ("type", *_LINEAR_FIELDS, "rank"),
    "TTLinear": ("type", *_LINEAR_FIELDS, "ranks", "in_factors", "out_factors"),
    "TuckerConv2d": ("type", *_CONV_FIELDS, "ranks"),
    "CPConv2d": ("type", *_CONV_FIELDS, "rank"),
    "FoldedBatchNorm": ("type", "conv", "num_features"),
}
# torch dtype -> the safetensors header's name for it
_DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


class CompressedFileError(ValueError):
    """`load_compressed` cannot load this file into this model: not a safetensors file, not
    written by `save_compressed`, malformed or crafted metadata, or a file for another model.
    The message names the path, and the layer and field at fault."""


# ---------------------------------------------------------------------------- saving
def _conv_geometry(mod) -> dict:
    return {
        "in_channels": mod.in_channels,
        "out_channels": mod.out_channels,
        "kernel_size": list(mod.kernel_size),
        "stride": list(mod.stride),
        "padding": mod.padding
        if isinstance(mod.padding, str)
        else list(mod.padding)
        if isinstance(mod.padding, tuple)
        else mod.padding,
        "dilation": list(mod.dilation),
        "padding_mode": mod.padding_mode,
        "bias": mod.bias is not None,
    }


def _spec(mod) -> dict | None:
    if isinstance(mod, LowRankLinear):
        return {
            "type": "LowRankLinear",
            "in_features": mod.in_features,
            "out_features": mod.out_features,
            "rank": mod.rank,
            "bias": mod.bias is not None,
        }
    if isinstance(mod, TTLinear):
        return {
            "type": "TTLinear",
            "in_features": mod.in_features,
            "out_features": mod.out_features,
            "ranks": list(mod.ranks),
            "in_factors": list(mod.in_factors),
            "out_factors": list(mod.out_factors),
            "bias": mod.bias is not None,
        }
    if isinstance(mod, TuckerConv2d):
        return {"type": "TuckerConv2d", "ranks": list(mod.ranks), **_conv_geometry(mod)}
    if isinstance(mod, CPConv2d):
        return {"type": "CPConv2d", "rank": mod.rank, **_conv_geometry(mod)}
    if isinstance(mod, FoldedBatchNorm):
        return {"type": "FoldedBatchNorm", "conv": mod.conv, "num_features": mod.num_features}
    return None


def compressed_layers(model: nn.Module) -> dict[str, dict]:
    """{name: spec} of the compressed layers inside ``model``, under every name a layer has (a
    module registered twice is replaced at both places on load)."""
    spec = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        found = _spec(mod)
        if found is not None:
            spec[name] = found
    return spec


def save_compressed(model: nn.Module, report=None, path="model.safetensors") -> str:
    """Write ``model``'s weights, its compressed-layer spec and the format version to ``path``
    (safetensors)."""
    from safetensors.torch import save_model

    meta = {_KEY: json.dumps(compressed_layers(model)), _FORMAT_KEY: str(FORMAT_VERSION)}
    if report is not None:
        meta["tensorpress.summary"] = json.dumps(
            {"method": report.method, "structure": report.structure, "kept_fraction": report.kept_fraction}
        )
    save_model(model, str(path), metadata=meta)
    return str(path)


# ---------------------------------------------------------------------------- the file
def _check_path(path) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a str or os.PathLike naming a .safetensors file, got {type(path).__name__}")
    where = os.fspath(path)
    if os.path.isdir(where):
        raise CompressedFileError(
            f"path: {where} is a directory; expected a .safetensors file written by save_compressed"
        )
    if not os.path.isfile(where):
        raise CompressedFileError(
            f"path: {where} does not exist (or is not a regular file); expected a "
            f".safetensors file written by save_compressed"
        )
    return where


def _read_header(where: str) -> tuple[dict[str, str], dict[str, tuple[tuple[int, ...], str]]]:
    """The metadata and {tensor name: (shape, dtype name)} from the safetensors header, which
    safetensors checks against the file's length; no tensor is loaded."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(where, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {}
            for key in f.keys():
                piece = f.get_slice(key)
                tensors[key] = (tuple(int(v) for v in piece.get_shape()), str(piece.get_dtype()))
    except (SafetensorError, OSError) as err:
        raise CompressedFileError(
            f"path: {where} is not a readable safetensors file (truncated or another format?): {err}"
        ) from err
    return meta, tensors


def _format_version(meta: dict[str, str], where: str) -> int:
    raw = meta.get(_FORMAT_KEY, "0")
    if not re.fullmatch(r"[0-9]{1,9}", raw):
        raise CompressedFileError(f"path: {where}: {_FORMAT_KEY}: expected a format version (an int), got {raw!r}")
    version = int(raw)
    if version > FORMAT_VERSION:
        raise CompressedFileError(
            f"path: {where}: {_FORMAT_KEY}: format {version} was written by a newer "
            f"tensorpress; this one reads formats 0 to {FORMAT_VERSION}"
        )
    return version


def _layer_specs(meta: dict[str, str], where: str) -> dict[str, dict]:
    if _KEY not in meta:
        raise CompressedFileError(
            f"path: {where} was not written by tensorpress.save_compressed (no {_KEY!r} metadata)"
        )
    try:
        specs = json.loads(meta[_KEY])
    except (ValueError, RecursionError) as err:
        raise CompressedFileError(f"path: {where}: {_KEY}: expected JSON, got unreadable text ({err})") from err
    if not isinstance(specs, dict):
        raise CompressedFileError(
            f"path: {where}: {_KEY}: expected an object {{layer name: spec}}, got {type(specs).__name__}"
        )
    for name, spec in specs.items():
        if not isinstance(spec, dict):
            raise CompressedFileError(
                f"path: {where}: layer {name!r}: expected an object of constructor arguments, got {type(spec).__name__}"
            )
    return specs


# ---------------------------------------------------------------------------- the schema
class _Fields:
    """Reads one layer's spec field by field; every failure names the path, layer and field."""

    def __init__(self, where: str, name: str, spec: dict):
        self.where, self.name, self.spec = where, name, spec

    def fail(self, field: str, message: str) -> CompressedFileError:
        return CompressedFileError(f"path: {self.where}: layer {self.name!r}: {field}: {message}")

    def int(self, field: str, lo: int = 1, hi: int | None = None) -> int:
        v = self.spec[field]
        if not is_int(v) or v < lo or (hi is not None and v > hi):
            bound = f"an int in [{lo}, {hi}]" if hi is not None else f"an int >= {lo}"
            raise self.fail(field, f"expected {bound}, got {v!r}")
        return v

    # builtins.int: in this class body "int" is the method above
    def ints(
        self,
        field: str,
        length: builtins.int | None = None,
        lo: builtins.int = 1,
        max_length: builtins.int | None = None,
    ) -> list[builtins.int]:
        v = self.spec[field]
        ok = isinstance(v, list) and all(is_int(x) and x >= lo for x in v)
        if not ok or (length is not None and len(v) != length) or (max_length is not None and len(v) > max_length):
            size = f"{length} " if length is not None else f"at most {max_length} " if max_length else ""
            raise self.fail(field, f"expected a list of {size}ints >= {lo}, got {v!r}")
        return v

    def bool(self, field: str) -> bool:
        v = self.spec[field]
        if not isinstance(v, bool):
            raise self.fail(field, f"expected true or false, got {v!r}")
        return v

    def same(self, field: str, value, model_value, what: str) -> None:
        """A field that must equal the dense model's: else the file is for another model."""
        if value != model_value:
            raise self.fail(
                field, f"the file has {value!r}, the model's {what} has {model_value!r} (a file for another model?)"
            )


def _check_fields(fields: _Fields) -> str:
    kind = fields.spec.get("type")
    if kind not in _CLASSES:
        raise fields.fail("type", f"expected one of {sorted(_CLASSES)}, got {kind!r} (written by a newer tensorpress?)")
    expected, given = set(_FIELDS[kind]), set(fields.spec)
    if given != expected:
        missing, extra = sorted(expected - given), sorted(given - expected)
        raise fields.fail(
            "fields",
            f"expected exactly {sorted(expected)} for a {kind}"
            + (f"; missing {missing}" if missing else "")
            + (f"; unknown {extra}" if extra else ""),
        )
    return kind


def _check_linear(fields: _Fields, module: nn.Module) -> dict:
    if not isinstance(module, nn.Linear):
        raise fields.fail(
            "type", f"a {fields.spec['type']} replaces an nn.Linear, but the model has a {type(module).__name__} there"
        )
    # bias is the file's own: the data-aware fits may add one the dense layer lacked
    kw = {
        "in_features": fields.int("in_features"),
        "out_features": fields.int("out_features"),
        "bias": fields.bool("bias"),
    }
    fields.same("in_features", kw["in_features"], module.in_features, "nn.Linear")
    fields.same("out_features", kw["out_features"], module.out_features, "nn.Linear")
    return kw


def _max_tt_ranks(out_factors: list[int], in_factors: list[int]) -> list[int]:
    """The largest useful bond ranks: the smaller side's size at each bond."""
    sizes = [m * n for m, n in zip(out_factors, in_factors)]
    return [min(math.prod(sizes[: k + 1]), math.prod(sizes[k + 1 :])) for k in range(len(sizes) - 1)]


def _check_tt(fields: _Fields, kw: dict) -> dict:
    in_factors = fields.ints("in_factors", max_length=MAX_TT_CORES)
    out_factors = fields.ints("out_factors", length=len(in_factors))
    if not in_factors:
        raise fields.fail("in_factors", "expected at least one factor, got []")
    if math.prod(in_factors) != kw["in_features"]:
        raise fields.fail("in_factors", f"expected factors of in_features = {kw['in_features']}, got {in_factors}")
    if math.prod(out_factors) != kw["out_features"]:
        raise fields.fail("out_factors", f"expected factors of out_features = {kw['out_features']}, got {out_factors}")
    ranks = fields.ints("ranks", length=len(in_factors) - 1)
    for k, (r, cap) in enumerate(zip(ranks, _max_tt_ranks(out_factors, in_factors))):
        if r > cap:
            raise fields.fail("ranks", f"bond {k}: expected at most {cap} (the smaller side's size), got {r}")
    return {**kw, "ranks": ranks, "in_factors": in_factors, "out_factors": out_factors}


def _pair(fields: _Fields, field: str) -> tuple[int, int]:
    first, second = fields.ints(field, length=2)
    return first, second


def _check_conv(fields: _Fields, module: nn.Module) -> dict:
    if not isinstance(module, nn.Conv2d) or module.groups != 1:
        raise fields.fail(
            "type",
            f"a {fields.spec['type']} replaces an nn.Conv2d with groups=1, but the model has "
            f"a {type(module).__name__} there",
        )
    kw = {
        "in_channels": fields.int("in_channels"),
        "out_channels": fields.int("out_channels"),
        "kernel_size": _pair(fields, "kernel_size"),
        "stride": _pair(fields, "stride"),
        "dilation": _pair(fields, "dilation"),
        "bias": fields.bool("bias"),
    }  # bias: as for linear layers
    padding = fields.spec["padding"]
    if isinstance(padding, list):
        padding = tuple(fields.ints("padding", length=2, lo=0))
    elif not isinstance(padding, str) and (not is_int(padding) or padding < 0):
        raise fields.fail("padding", f"expected 'same', 'valid', an int >= 0 or a list of 2, got {padding!r}")
    kw["padding"] = padding
    kw["padding_mode"] = fields.spec["padding_mode"]
    for field in ("in_channels", "out_channels", "kernel_size", "stride", "dilation", "padding_mode"):
        fields.same(field, kw[field], getattr(module, field), "nn.Conv2d")
    # a layer built with padding=p records p; nn.Conv2d holds (p, p)
    fields.same("padding", (padding, padding) if isinstance(padding, int) else padding, module.padding, "nn.Conv2d")
    return kw


def _check_folded(fields: _Fields, module: nn.Module, model: nn.Module) -> dict:
    """A FoldedBatchNorm: a BatchNorm in the dense model, folded into the nn.Conv2d it names."""
    if not isinstance(module, nn.modules.batchnorm._BatchNorm):
        raise fields.fail(
            "type", f"a FoldedBatchNorm replaces a BatchNorm, but the model has a {type(module).__name__} there"
        )
    n = fields.int("num_features")
    fields.same("num_features", n, module.num_features, type(module).__name__)
    conv = fields.spec["conv"]
    if not isinstance(conv, str):
        raise fields.fail("conv", f"expected the name of the conv it was folded into, got {conv!r}")
    try:
        target = model.get_submodule(conv)
    except AttributeError:
        target = None
    if type(target) is not nn.Conv2d or target.out_channels != n:
        raise fields.fail(
            "conv",
            f"expected an nn.Conv2d with {n} output channels at {conv!r}, the model has "
            f"{type(target).__name__ if target is not None else 'no module'} there",
        )
    return {"conv": conv, "num_features": n}


def _check_spec(fields: _Fields, module: nn.Module, model: nn.Module) -> dict:
    """The constructor arguments of one layer, each checked against the schema and against
    the dense module it replaces; ranks within what the shape allows."""
    kind = _check_fields(fields)
    if kind == "FoldedBatchNorm":
        return _check_folded(fields, module, model)
    if kind == "LowRankLinear":
        kw = _check_linear(fields, module)
        return {**kw, "rank": fields.int("rank", hi=min(kw["in_features"], kw["out_features"]))}
    if kind == "TTLinear":
        return _check_tt(fields, _check_linear(fields, module))
    kw = _check_conv(fields, module)
    out_c, in_c, (kh, kw_) = kw["out_channels"], kw["in_channels"], kw["kernel_size"]
    if kind == "TuckerConv2d":
        ranks = fields.ints("ranks", length=2)
        if ranks[0] > out_c or ranks[1] > in_c:
            raise fields.fail("ranks", f"expected [r_out <= {out_c}, r_in <= {in_c}], got {ranks}")
        return {**kw, "ranks": tuple(ranks)}
    # no kernel has a CP rank above the product of all its sizes but the largest
    sizes = (out_c, in_c, kh, kw_)
    return {**kw, "rank": fields.int("rank", hi=math.prod(sizes) // max(sizes))}


# ---------------------------------------------------------------------------- the model
def _module_at(model: nn.Module, name: str, fields: _Fields) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as err:
        raise fields.fail("name", "the model has no such module (a file for another model?)") from err


def _build(kind: str, kw: dict, device, dtype) -> nn.Module:
    if kind == "FoldedBatchNorm":  # no tensors of its own
        return FoldedBatchNorm(**kw)
    return _CLASSES[kind](**kw, device=device, dtype=dtype)


def _folded_biases(model: nn.Module, checked: dict) -> dict[str, nn.Conv2d]:
    """{conv name: conv} of the dense convs (not replaced by the file) that a folded BatchNorm
    gave the bias they lack in the dense model."""
    out: dict[str, nn.Conv2d] = {}
    for kind, kw, _ in checked.values():
        if kind == "FoldedBatchNorm" and kw["conv"] not in checked:
            conv = cast(nn.Conv2d, model.get_submodule(kw["conv"]))  # _check_folded checked its type
            if conv.bias is None:
                out[kw["conv"]] = conv
    return out


def _meta_layer(fields: _Fields, kind: str, kw: dict, dtype) -> nn.Module:
    """The layer on the meta device: its parameters' shapes without allocating them."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the real build warns, once
            return _build(kind, kw, "meta", dtype)
    except (ValueError, TypeError) as err:
        raise fields.fail("fields", f"the {kind} constructor rejects them: {err}") from err


def _alias_key(t: torch.Tensor) -> tuple:
    """Tensors of the dense model with the same key share storage: save_model keeps one name."""
    return ("dense", t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))


def _prefixed(name: str, key: str) -> str:
    return f"{name}.{key}" if name else key


def _expected_tensors(
    model: nn.Module, layers: dict[str, nn.Module], biased: dict[str, nn.Conv2d] | None = None
) -> dict[str, tuple]:
    """{key: (shape, dtype, alias group)} of the model load_compressed would build: the dense
    model's tensors outside the replaced layers, the replaced layers' own (one group per
    dense module, so a module under several names counts once), and the bias of each conv in
    ``biased``."""
    replaced = [name for name in layers]
    expected = {}
    for key, t in model.state_dict(keep_vars=True).items():
        if not any(name == "" or key.startswith(name + ".") for name in replaced):
            expected[key] = (tuple(t.shape), t.dtype, _alias_key(t))
    for name, layer in layers.items():
        owner = id(model.get_submodule(name))
        for key, t in layer.state_dict(keep_vars=True).items():
            expected[_prefixed(name, key)] = (tuple(t.shape), t.dtype, ("layer", owner, key))
    for name, conv in (biased or {}).items():
        expected[_prefixed(name, "bias")] = ((conv.out_channels,), conv.weight.dtype, ("bias", name))
    return expected


def _check_tensors(expected: dict[str, tuple], header: dict[str, tuple], where: str) -> None:
    """Every tensor of the file against the model it would go into: names, shapes, dtypes;
    a tensor the file lacks must share storage with one it has (save_model keeps one name)."""
    for key, (shape, dtype_name) in header.items():
        if key not in expected:
            raise CompressedFileError(
                f"path: {where}: tensor {key!r}: the model to load has no such tensor (a file for another model?)"
            )
        want_shape, want_dtype, _ = expected[key]
        if shape != want_shape:
            raise CompressedFileError(
                f"path: {where}: tensor {key!r}: the file has shape {shape}, the model expects {want_shape}"
            )
        want_name = _DTYPE_NAMES.get(want_dtype)
        if want_name is not None and dtype_name != want_name:
            raise CompressedFileError(
                f"path: {where}: tensor {key!r}: the file has dtype {dtype_name}, the model "
                f"has {want_dtype} (convert the model with .to(dtype) first)"
            )
    present = {expected[key][2] for key in header}
    for key, (_, _, group) in expected.items():
        if key not in header and group not in present:
            raise CompressedFileError(f"path: {where}: tensor {key!r}: missing from the file")


def _replace(model: nn.Module, name: str, layer: nn.Module) -> nn.Module:
    """model with the module at ``name`` replaced (the layer itself for the root)."""
    if not name:
        return layer
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
    return model


def _checked_layers(model: nn.Module, specs: dict[str, dict], where: str) -> dict[str, tuple]:
    """{name: (kind, kwargs, meta layer)} once every spec passes the schema and matches the
    dense module it replaces."""
    checked = {}
    for name, spec in specs.items():
        fields = _Fields(where, name, spec)
        module = _module_at(model, name, fields)
        kw = _check_spec(fields, module, model)
        kind = spec["type"]
        weight = getattr(module, "weight", None)  # a BatchNorm's is None without affine
        checked[name] = (kind, kw, _meta_layer(fields, kind, kw, None if weight is None else weight.dtype))
    return checked


def load_compressed(model: nn.Module, path) -> nn.Module:
    """A copy of the dense ``model`` with the layers recorded in ``path`` replaced and every
    weight loaded from it.

    The file is checked in full before anything is allocated (see the module docstring);
    files without a format version (written before it existed) load when they pass the same
    checks. Raises CompressedFileError (a ValueError) naming the path, layer and field when
    the file is missing, a directory, not safetensors, truncated, malformed, or written for
    another model.
    """
    from safetensors.torch import load_model

    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected the dense nn.Module the file was compressed from, got {type(model).__name__}")
    where = _check_path(path)
    meta, header = _read_header(where)
    _format_version(meta, where)
    checked = _checked_layers(model, _layer_specs(meta, where), where)
    biased = _folded_biases(model, checked)
    _check_tensors(_expected_tensors(model, {n: c[2] for n, c in checked.items()}, biased), header, where)

    out = copy.deepcopy(model)
    for name in biased:  # a dense conv that took its folded BatchNorm's shift as its bias
        conv = cast(nn.Conv2d, out.get_submodule(name))  # a conv of the model's copy (_folded_biases)
        conv.bias = nn.Parameter(torch.zeros(conv.out_channels, device=conv.weight.device, dtype=conv.weight.dtype))
    built = {}  # one layer per dense module, however many names it has
    for name, (kind, kw, _) in checked.items():
        old = out.get_submodule(name)
        if id(old) not in built:
            like = (None, None) if kind == "FoldedBatchNorm" else (old.weight.device, old.weight.dtype)
            built[id(old)] = _build(kind, kw, *like)
        out = _replace(out, name, built[id(old)])
    try:
        load_model(out, where)
    except RuntimeError as err:
        raise CompressedFileError(f"path: {where}: the tensors do not load into the model: {err}") from err
    return out
