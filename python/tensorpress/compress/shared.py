"""Modules used at more than one place: a layer called several times per forward pass, a
module registered under several names (``Sequential(lin, act, lin)``), and layers whose
weights are tied to another module's.

compress() fits a layer called several times on the statistics of all its calls, replaces it
under every name it has (so the copies stay one module), reports its worst call's output
error, and keeps layers with tied weights dense (a replacement would untie them).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from tensorpress.compress import distributed as tpdist
from tensorpress.compress.calibrate import call_model, hooks, naming_batch, row_mask, rows, run_until_stop


def module_names(model: nn.Module) -> dict[int, list[str]]:
    """{id(module): every name it is registered under in ``model``, first name first}."""
    names: dict[int, list[str]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        names.setdefault(id(mod), []).append(name)
    return names


def swap_module(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` wherever ``old`` is registered in ``model`` (under every name it has), so a
    module registered twice stays one module."""
    for parent in list(model.modules()):
        # _modules, not named_children(): that one lists a module registered twice once
        for child_name, child in list(parent._modules.items()):
            if child is old:
                setattr(parent, child_name, new)


def tied_layers(model: nn.Module, layers: Mapping[str, nn.Module]) -> dict[str, str]:
    """{layer name: why it is kept dense} for the layers holding a parameter that another
    module holds too (tied weights, e.g. a language model's head and its embedding)."""
    holders: dict[int, list[str]] = {}
    for name, mod in model.named_modules():
        for p in mod.parameters(recurse=False):
            holders.setdefault(id(p), []).append(name)
    out = {}
    for name, layer in layers.items():
        for pname, p in layer.named_parameters(recurse=False):
            others = [h for h in holders.get(id(p), []) if h != name]
            if others:
                out[name] = (
                    f"its {pname} is tied to {', '.join(repr(o) for o in others)}: kept dense, since "
                    f"replacing it would untie them"
                )
                break
    return out


def _output_rows(layer: nn.Module, y: Tensor, mask: Tensor | None) -> Tensor:
    """A layer's output as rows for the error sums (a conv's every output element counts)."""
    if isinstance(layer, nn.Conv2d):
        return y.reshape(-1, 1)
    return rows(y, mask)


def _outputs(
    model: nn.Module, modules: Mapping[str, nn.Module], run: Callable[[], object], keep_inputs: bool
) -> dict[str, list[tuple[Tensor | None, Tensor]]]:
    """{name: [(input or None, output) per call]} of the named modules in one pass of run()."""
    seen: dict[str, list] = {n: [] for n in modules}

    def make(name):
        def hook(_mod, args, out):
            seen[name].append((args[0] if keep_inputs else None, out))

        return hook

    with hooks([m.register_forward_hook(make(n)) for n, m in modules.items()]):
        run_until_stop(run)
    return seen


def call_errors(
    ref: nn.Module,
    cmp: nn.Module,
    batches: Sequence,
    names: Sequence[str],
    one_shot: bool,
    positions: Sequence[int] | None = None,
) -> dict[str, list[float]]:
    """{layer: [||Y_k - Y^_k||_F / ||Y_k||_F for each call k]} over the calibration batches,
    measured on the models themselves: Y_k is the original layer's output at its k-th call
    in ``ref``, Y^_k the output of its replacement in ``cmp``, run on the same input
    (``one_shot``: the methods fitted on the original model's inputs) or at its k-th call in
    ``cmp`` (sequential methods: the inputs of the returned model)."""
    ref_of = {n: ref.get_submodule(n) for n in names}
    cmp_of = {n: cmp.get_submodule(n) for n in names}
    err2: dict[str, list[float]] = {n: [] for n in names}
    energy: dict[str, list[float]] = {n: [] for n in names}
    for b, batch in enumerate(batches):
        mask = row_mask(batch)
        with naming_batch(b if positions is None else positions[b]), torch.no_grad():
            got_ref = _outputs(ref, ref_of, functools.partial(call_model, ref, batch), keep_inputs=one_shot)
            got_cmp = (
                {n: [(None, cmp_of[n](x)) for x, _ in got_ref[n]] for n in names}
                if one_shot
                else _outputs(cmp, cmp_of, functools.partial(call_model, cmp, batch), keep_inputs=False)
            )
        for n in names:
            if len(got_ref[n]) != len(got_cmp[n]):
                raise RuntimeError(
                    f"layer {n!r}: called {len(got_ref[n])} times by the original model and "
                    f"{len(got_cmp[n])} times by the compressed one on calibration batch "
                    f"{b if positions is None else positions[b]}"
                )
            for k, ((_, y), (_, y_hat)) in enumerate(zip(got_ref[n], got_cmp[n])):
                y = _output_rows(ref_of[n], y, mask).to(torch.float64)
                y_hat = _output_rows(ref_of[n], y_hat, mask).to(torch.float64)
                if k == len(err2[n]):
                    err2[n].append(0.0)
                    energy[n].append(0.0)
                err2[n][k] += (y - y_hat).square().sum().item()
                energy[n][k] += y.square().sum().item()
    return {n: _relative(*_summed(err2[n], energy[n])) for n in names}


def _summed(err2: list[float], energy: list[float]) -> tuple[list[float], list[float]]:
    """Per-call sums over the processes of torch.distributed (each its share of the batches)."""
    parts = tpdist.gather_objects((err2, energy))
    calls = max(len(e) for e, _ in parts)
    tot_err = [sum(e[k] for e, _ in parts if k < len(e)) for k in range(calls)]
    tot_energy = [sum(en[k] for _, en in parts if k < len(en)) for k in range(calls)]
    return tot_err, tot_energy


def _relative(err2: list[float], energy: list[float]) -> list[float]:
    return [(e / max(en, 1e-300)) ** 0.5 for e, en in zip(err2, energy)]
