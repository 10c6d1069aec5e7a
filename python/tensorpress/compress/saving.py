"""Saving a compressed model and rebuilding it from the original architecture.

The file is a safetensors state_dict whose metadata records which layers were replaced by
what ({"name": {"type": "LowRankLinear" | "TTLinear" | "TuckerConv2d" | "CPConv2d", and the
constructor arguments}}), so
`load_compressed(dense_model, path)` can swap the same layers in and load the weights.
"""
from __future__ import annotations

import copy
import json

from torch import nn

from tensorpress.nn.cp_conv2d import CPConv2d
from tensorpress.nn.lowrank_linear import LowRankLinear
from tensorpress.nn.tt_linear import TTLinear
from tensorpress.nn.tucker_conv2d import TuckerConv2d

_KEY = "tensorpress.layers"


def _conv_geometry(mod) -> dict:
    return {"in_channels": mod.in_channels, "out_channels": mod.out_channels, "kernel_size": list(mod.kernel_size),
            "stride": list(mod.stride), "padding": mod.padding if isinstance(mod.padding, str) else list(
                mod.padding) if isinstance(mod.padding, tuple) else mod.padding,
            "dilation": list(mod.dilation), "padding_mode": mod.padding_mode, "bias": mod.bias is not None}


def _spec(mod) -> dict | None:
    if isinstance(mod, LowRankLinear):
        return {"type": "LowRankLinear", "in_features": mod.in_features, "out_features": mod.out_features,
                "rank": mod.rank, "bias": mod.bias is not None}
    if isinstance(mod, TTLinear):
        return {"type": "TTLinear", "in_features": mod.in_features, "out_features": mod.out_features,
                "ranks": list(mod.ranks), "in_factors": list(mod.in_factors), "out_factors": list(mod.out_factors),
                "bias": mod.bias is not None}
    if isinstance(mod, TuckerConv2d):
        return {"type": "TuckerConv2d", "ranks": list(mod.ranks), **_conv_geometry(mod)}
    if isinstance(mod, CPConv2d):
        return {"type": "CPConv2d", "rank": mod.rank, **_conv_geometry(mod)}
    return None


def _build(spec: dict, device, dtype):
    kind = spec["type"]
    kw = {k: v for k, v in spec.items() if k != "type"}
    classes = {"LowRankLinear": LowRankLinear, "TTLinear": TTLinear, "TuckerConv2d": TuckerConv2d,
               "CPConv2d": CPConv2d}
    if kind not in classes:
        raise ValueError(f"path: unknown compressed layer type {kind!r} (written by a newer tensorpress?)")
    for key in ("kernel_size", "stride", "dilation", "padding"):
        if isinstance(kw.get(key), list):
            kw[key] = tuple(kw[key])
    return classes[kind](**kw, device=device, dtype=dtype)


def compressed_layers(model: nn.Module) -> dict[str, dict]:
    """{name: spec} of the compressed layers inside ``model``."""
    spec = {}
    for name, mod in model.named_modules():
        found = _spec(mod)
        if found is not None:
            spec[name] = found
    return spec


def save_compressed(model: nn.Module, report=None, path="model.safetensors") -> str:
    """Write ``model``'s weights and its compressed-layer spec to ``path`` (safetensors)."""
    from safetensors.torch import save_model

    meta = {_KEY: json.dumps(compressed_layers(model))}
    if report is not None:
        meta["tensorpress.summary"] = json.dumps({"method": report.method, "structure": report.structure,
                                                  "kept_fraction": report.kept_fraction})
    save_model(model, str(path), metadata=meta)
    return str(path)


def load_compressed(model: nn.Module, path) -> nn.Module:
    """A copy of the dense ``model`` with the layers recorded in ``path`` replaced and every
    weight loaded from it."""
    from safetensors import safe_open
    from safetensors.torch import load_model

    from tensorpress.compress.sequential import set_submodule

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if _KEY not in meta:
        raise ValueError(f"path: {path} was not written by tensorpress.save_compressed (no {_KEY!r} metadata)")
    out = copy.deepcopy(model)
    for name, spec in json.loads(meta[_KEY]).items():
        try:
            old = out.get_submodule(name)
        except AttributeError as err:
            raise ValueError(f"model: has no layer {name!r} recorded in {path}") from err
        ref = next(old.parameters())
        set_submodule(out, name, _build(spec, ref.device, ref.dtype))
    load_model(out, str(path))
    return out
