"""The fits of one compress() call: each layer's fit at its chosen rank, its replacement
module and its line of the report, one layer after another from one-shot statistics or as the
sequential pass reaches it (compress_sequential calls back into LayerFitter.fit_in_sequence).
compress() in api.py resolves the settings and the ranks and hands them to a LayerFitter."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from tensorpress.compress.account import dense_reason
from tensorpress.compress.lowrank import LowRankFit, fit_activation, truncate_fit
from tensorpress.compress.output_error import output_error
from tensorpress.compress.progress import progress_bar
from tensorpress.compress.rank_rules import cached, full_fit_key
from tensorpress.compress.report import CompressionReport, LayerReport
from tensorpress.compress.sequential import compress_sequential
from tensorpress.compress.shared import swap_module
from tensorpress.compress.stats import GramStats
from tensorpress.compress.structures import (
    LowRank,
    StructureAdapter,
    dense_macs_per_row,
    layer_bias,
    module_params,
    weight_matrix,
)

ONE_SHOT_METHODS = ("svd", "whitened")

# a layer the rank rule keeps dense is refitted at full rank on the compressed model's inputs
# (sequential "activation") when the calibration rows are at least this many times its inputs
# (fewer rows would let the least-squares fit chase noise)
DENSE_REFIT_MIN_ROWS_PER_INPUT = 4


def identity_fit(layer: nn.Module) -> LowRankFit:
    """The layer kept dense, as a 'fit' (W = I @ W) for the error report."""
    w = weight_matrix(layer).to(torch.float64)
    eye = torch.eye(w.shape[0], dtype=torch.float64, device=w.device)
    bias = layer_bias(layer)
    return LowRankFit(w, eye, None if bias is None else bias.detach().to(torch.float64), {"method": "dense"})


def dense_refit(layer: nn.Linear, stats: GramStats, offset, ridge_kw: dict) -> tuple[LowRankFit, nn.Linear]:
    """(fit, nn.Linear) of the same shape whose weights are the least-squares fit of the
    original outputs (plus the residual offset) on the compressed model's inputs."""
    full = min(layer.in_features, layer.out_features)
    fit = fit_activation(layer.weight, layer.bias, stats, full, offset=offset, **ridge_kw)
    new = nn.Linear(
        layer.in_features, layer.out_features, bias=True, device=layer.weight.device, dtype=layer.weight.dtype
    )
    assert new.bias is not None and fit.bias is not None  # bias=True, and the fit of a biased layer has one
    with torch.no_grad():
        new.weight.copy_(fit.weight())
        new.bias.copy_(fit.bias)
    fit.info["method"] = "dense"
    fit.info["refit"] = True
    return fit, new


@dataclass
class LayerFitter:
    """Fits the layers of ``cmp`` (the compressed copy, modified in place) at the ranks in
    ``chosen`` (None: kept dense) and appends their lines to ``report``; ``dense_why`` collects
    why each layer kept dense was (for the report's account)."""

    structure: str
    adapter: StructureAdapter
    layers: Mapping[str, nn.Module]  # the targets, as modules of the model being compressed
    per_layer: Mapping[str, str]  # each target's method
    chosen: Mapping[str, Any]
    ranks: Mapping[str, Any] | None  # compress()'s ranks argument (for the dense reasons)
    rank_rule: str | None
    ridge_kw: dict
    cache: dict | None
    report: CompressionReport
    cmp: nn.Module
    names_of: Mapping[int, list[str]]
    calls: Mapping[str, int]
    report_error: bool
    dense_why: dict[str, str] = field(default_factory=dict)

    def fit(self, name: str, stats: GramStats | None, method: str, offset=None) -> tuple[Any, nn.Module]:
        """(fit, replacement module) of one layer; the module is the layer itself when it is
        kept dense as it was."""
        layer = self.layers[name]
        if self.chosen[name] is None:
            if (
                type(layer) is nn.Linear
                and method == "activation"
                and stats is not None
                and stats.paired
                and layer.bias is not None
                and stats.n >= DENSE_REFIT_MIN_ROWS_PER_INPUT * layer.in_features
            ):
                return dense_refit(layer, stats, offset, self.ridge_kw)
            return identity_fit(layer), layer
        if self.structure == "lowrank" and method in ONE_SHOT_METHODS:
            # one decomposition per layer, truncated to each rank asked for (a cache shared by
            # a sweep over budgets keeps it)
            linear = cast(nn.Linear, layer)
            top = min(linear.in_features, linear.out_features)
            full = cached(
                self.cache,
                full_fit_key(method, name, self.ridge_kw),
                lambda: self.adapter.fit(method, layer, stats, top, self.ridge_kw),
            )
            fit = truncate_fit(full, self.chosen[name], linear.weight, linear.bias, None if method == "svd" else stats)
        elif self.structure == "lowrank":  # residual feedback reaches the low-rank fits only
            lowrank = cast(LowRank, self.adapter)
            fit = lowrank.fit(method, cast(nn.Linear, layer), stats, self.chosen[name], self.ridge_kw, offset=offset)
        else:
            fit = self.adapter.fit(method, layer, stats, self.chosen[name], self.ridge_kw)
        return fit, self.adapter.module(layer, fit)

    def record(self, name: str, fit, module: nn.Module, stats: GramStats | None, seconds: float) -> None:
        """The layer's line of the report (and, kept dense, the reason)."""
        layer = self.layers[name]
        out_f, in_f = weight_matrix(layer).shape
        dense = fit.info.get("method") == "dense"
        rel_error = output_error(layer, fit, stats) if stats is not None and self.report_error else float("nan")
        self.report.layers.append(
            LayerReport(
                name=name,
                structure="dense" if dense else self.structure,
                method=self.per_layer[name],
                shape=(out_f, in_f),
                rank=(min(in_f, out_f) if dense else self.adapter.report_rank(fit)),
                params_before=module_params(layer),
                params_after=module_params(module),
                flops_before=dense_macs_per_row(layer),
                flops_after=(dense_macs_per_row(layer) if dense else self.adapter.macs_per_row(layer, module)),
                rel_error=rel_error,
                seconds=seconds,
                calls=self.calls.get(name, 1),
                aliases=self.names_of[id(layer)][1:],
                rows=0 if stats is None else stats.n,
                statistics="none" if stats is None else stats.representation,
            )
        )
        if dense:
            refit = "; refitted at full rank by least squares on the compressed model's inputs"
            why = dense_reason(name, self.ranks, self.rank_rule)
            self.dense_why[name] = why + (refit if fit.info.get("refit") else "")

    def fit_one_shot(self, targets: Sequence[str], shot: Mapping[str, GramStats] | None, method: str, progress) -> None:
        """Every layer from the original model's statistics (or none: "svd"), in order."""
        bar = progress_bar(len(targets), f"fitting ({self.structure}, {method})", progress)
        for name in targets:
            t0 = time.perf_counter()
            stats = None if shot is None else shot[name]
            fit, module = self.fit(name, stats, method)
            if module is not self.layers[name]:
                swap_module(self.cmp, self.cmp.get_submodule(name), module)
            self.record(name, fit, module, stats, time.perf_counter() - t0)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        self.report.mode = "one-shot"

    def fit_in_sequence(self, name: str, stats: GramStats, offset) -> nn.Module:
        """compress_sequential's callback: the layer fitted on the compressed model's inputs."""
        t0 = time.perf_counter()
        fit, module = self.fit(name, stats, self.per_layer[name], offset)
        if module is self.layers[name]:  # kept dense: the copy's own layer stays
            module = self.cmp.get_submodule(name)
        self.record(name, fit, module, stats, time.perf_counter() - t0)
        return module

    def fit_sequential(
        self,
        ref: nn.Module,
        batches: Sequence,
        targets: Sequence[str],
        shot: Mapping[str, GramStats] | None,
        keep_rows: int,
        residual_feedback: bool,
        positions: Sequence[int],
        plans: Mapping,
        progress,
    ) -> None:
        """Every layer fitted as the sequential pass over the calibration batches reaches it."""
        bar = progress_bar(0, "calibrating", progress)
        if bar is not None:
            bar.total = None
        feedback = (
            [n for n in targets if self.per_layer[n] == "activation" and self.chosen[n] is not None]
            if residual_feedback and self.structure == "lowrank"
            else []
        )
        info = compress_sequential(
            ref,
            self.cmp,
            batches,
            targets,
            self.fit_in_sequence,
            keep_rows=keep_rows,
            progress=bar,
            reference=shot,
            cache=self.cache,
            residual_feedback=feedback,
            projectable=[n for n in targets if self.per_layer[n] == "activation"],
            positions=positions,
            plans=plans,
        )
        self.report.residual_feedback = info["residual_feedback"]
        self.report.notes += info["notes"]
        if bar is not None:
            bar.close()
        self.report.mode = info["mode"]
