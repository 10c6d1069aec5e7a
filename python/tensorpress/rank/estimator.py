"""scikit-learn's estimator parameter protocol, without depending on scikit-learn at run time.

An estimator's parameters are its constructor's named arguments, stored unchanged as
attributes of the same name (scikit-learn's convention: `clone`, grid searches and pipelines
rely on it). The names are read from the constructor's signature, so a new argument cannot be
left out of get_params by hand.
"""

from __future__ import annotations

import inspect
from typing import Any


class EstimatorParams:
    """get_params / set_params / repr from the constructor's signature (nested `a__b` keys for
    parameters that are estimators themselves)."""

    @classmethod
    def _param_names(cls) -> list[str]:
        names = []
        for p in inspect.signature(cls.__init__).parameters.values():
            if p.name == "self":
                continue
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                raise TypeError(f"{cls.__name__}.__init__: named arguments only (scikit-learn's convention)")
            names.append(p.name)
        return names

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in self._param_names():
            value = getattr(self, name)
            if deep and hasattr(value, "get_params") and not isinstance(value, type):
                out.update({f"{name}__{k}": v for k, v in value.get_params(deep=True).items()})
            out[name] = value
        return out

    def set_params(self, **params: Any) -> EstimatorParams:
        valid = self._param_names()
        nested: dict[str, dict[str, Any]] = {}
        for key, value in params.items():
            name, _, sub = key.partition("__")
            if name not in valid:
                raise ValueError(f"{key}: not a parameter of {type(self).__name__} (expected one of {valid})")
            if sub:
                nested.setdefault(name, {})[sub] = value
            else:
                setattr(self, name, value)
        for name, sub_params in nested.items():
            getattr(self, name).set_params(**sub_params)
        return self

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={getattr(self, k)!r}" for k in self._param_names())
        return f"{type(self).__name__}({args})"
