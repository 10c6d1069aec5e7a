"""A fitted layer's output error on calibration rows, from their Gram statistics."""

from __future__ import annotations

import math

import torch
from torch import nn

from tensorpress.compress.stats import GramStats
from tensorpress.compress.structures import layer_bias, weight_matrix


def output_error_parts(layer: nn.Module, fit, stats: GramStats) -> tuple[float, float]:
    """(||X W^T + b - (X~ W^^T + b^)||_F^2, ||X W^T + b||_F^2) over the rows of ``stats``;
    ``fit`` has ``weight()`` (the dense W^ as a matrix) and ``bias``. The rows need not be
    those the fit was made from (held-out rows score a fit made on others)."""
    w = weight_matrix(layer).to(torch.float64)
    bias = layer_bias(layer)
    b = torch.zeros(w.shape[0], dtype=torch.float64) if bias is None else bias.to(torch.float64)
    wh = fit.weight().to(torch.float64)
    bh = torch.zeros_like(b) if fit.bias is None else fit.bias.to(torch.float64)
    n = stats.n

    mean_ref_out = w @ stats.mean_ref + b
    mean_diff = mean_ref_out - (wh @ stats.mean_in + bh)
    energy_c = torch.tensor(stats.ref_energy(w), dtype=torch.float64)
    err2 = energy_c - 2 * (wh * stats.cov_cross_times(w).T).sum() + stats.in_quad(wh) + n * mean_diff.square().sum()
    energy = energy_c + n * mean_ref_out.square().sum()
    return max(err2.item(), 0.0), energy.item()


def output_error(layer: nn.Module, fit, stats: GramStats) -> float:
    """||X W^T + b - (X~ W^^T + b^)||_F / ||X W^T + b||_F on the calibration rows."""
    err2, energy = output_error_parts(layer, fit, stats)
    return math.sqrt(err2 / max(energy, 1e-300))
