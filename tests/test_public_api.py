"""The public API: tp.compress is both the function and the subpackage, and every subpackage's
__all__ lists names that exist and carry a docstring."""

from __future__ import annotations

import importlib
import types

import pytest
import torch

import tensorpress as tp

SUBPACKAGES = ["compress", "decompose", "linalg", "nn", "ops", "rank", "train", "zoo", "tt_format"]


def test_compress_is_the_subpackage_and_the_function():
    import tensorpress.compress as sub

    assert isinstance(sub, types.ModuleType) and sub is tp.compress
    assert sub.save_compressed is importlib.import_module("tensorpress.compress.saving").save_compressed
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    small, report = tp.compress(model, [torch.randn(64, 16)], budget=0.5)
    assert report.kept_fraction <= 0.5 and small is not model
    with pytest.raises(ValueError, match=r"^budget: expected a fraction"):
        tp.compress(model, [torch.randn(4, 16)], budget=2.0)


@pytest.mark.parametrize("name", SUBPACKAGES)
def test_all_names_exist_and_are_documented(name):
    mod = importlib.import_module(f"tensorpress.{name}")
    assert mod.__doc__, f"tensorpress.{name} has no docstring"
    exported = getattr(mod, "__all__", None)
    assert exported, f"tensorpress.{name} has no __all__"
    assert len(exported) == len(set(exported)), "duplicates in __all__"
    undocumented = []
    for attr in exported:
        obj = getattr(mod, attr)  # AttributeError: __all__ names something that is not there
        # a submodule of the same name shadows what __init__ imported (cp_overparam once did)
        assert name == "zoo" or not isinstance(obj, types.ModuleType), f"tensorpress.{name}.{attr} is a module"
        if callable(obj) and not isinstance(obj, type(tp)) and not (getattr(obj, "__doc__", None) or "").strip():
            undocumented.append(attr)
    assert not undocumented, f"tensorpress.{name}: no docstring on {undocumented}"
