"""Saving a compressed model and rebuilding it from the original architecture.

The file is a safetensors state_dict whose metadata records which layers were replaced by
what ({"name": {"type": "LowRankLinear", "in_features", "out_features", "rank", "bias"}}), so
`load_compressed(dense_model, path)` can swap the same layers in and load the weights.
"""
from __future__ import annotations

import copy
import json

from torch import nn

from tensorpress.nn.lowrank_linear import LowRankLinear

_KEY = "tensorpress.layers"


def compressed_layers(model: nn.Module) -> dict[str, dict]:
    """{name: spec} of the compressed layers inside ``model``."""
    spec = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LowRankLinear):
            spec[name] = {"type": "LowRankLinear", "in_features": mod.in_features, "out_features": mod.out_features,
                          "rank": mod.rank, "bias": mod.bias is not None}
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
        set_submodule(out, name, LowRankLinear(spec["in_features"], spec["out_features"], spec["rank"],
                                               bias=spec["bias"], device=ref.device, dtype=ref.dtype))
    load_model(out, str(path))
    return out
