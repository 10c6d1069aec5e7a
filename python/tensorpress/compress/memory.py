"""The memory plan of compress(): before any calibration pass, estimate what each layer's
statistics and fit need and pick for each layer a representation of its statistics that fits
a budget (see :mod:`tensorpress.compress.stats` for the representations).

The estimate counts what grows with a layer's dimensions: the accumulators (an (in, in) Gram
is in^2 * 8 bytes in float64: 34 GB for the 65,536-feature patches of a 1,024-channel conv
with 64x1 kernels), the float64 temporaries of the fit (the centered Gram, its ridged copy or
Cholesky factor) and one chunk of calibration rows (the patches are unfolded a chunk of samples
at a time, never the whole batch). The model, its compressed copy and the calibration batches
themselves are the caller's and are not counted: the default budget is a fraction of the memory
available when compress() starts, after they were made.

Each layer starts with its exact float64 statistics; while the estimated peak is over the
budget, the layer needing the most steps down one representation: "exact" -> "exact-fp32"
(float32 Gram) -> "kronecker" (convolutions fitted by "activation"/"whitened" only). When even
the smallest does not fit, :class:`MemoryPlanError` names the layer, the estimate and the
options, before any work.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, field
from typing import cast

import torch
from torch import nn

# the default budget: this fraction of MemAvailable when compress() starts
DEFAULT_MEMORY_FRACTION = 0.5
# calibration rows are fed to the accumulators in chunks of at most this many bytes of float32
# rows (the budget's 1/16th when smaller, at least CHUNK_MIN_BYTES)
CHUNK_MAX_BYTES = 128 << 20
CHUNK_MIN_BYTES = 64 << 10
# the float64 (in, in) temporaries a fit reads its exact Gram through: the centered copy, the
# outer product it subtracts, then the ridged copy / Cholesky factor
EXACT_FIT_MATRICES = 3
# the (out, in) float64 matrices a structured fit holds at once (kernel, target, CG vectors, the
# vector-Jacobian products' intermediates): 33 measured at the peak of a 1,024-channel 64x1 Tucker fit
FIT_KERNEL_MATRICES = 32

APPROXIMATIONS = {
    "exact": "exact float64 Gram",
    "exact-fp32": "exact Gram kept in float32 (about 1e-7 relative rounding per batch)",
    "kronecker": (
        "Kronecker-factored patch covariance (channels x spatial offsets; exact only for inputs whose "
        "second moment separates); output energy and cross statistics exact"
    ),
    "none": "no statistics (weights only)",
}
_STEPS = ("exact", "exact-fp32", "kronecker")


class MemoryPlanError(ValueError):
    """No representation of some layer's statistics fits the memory budget."""


def available_memory() -> int:
    """Bytes of memory available now: MemAvailable of /proc/meminfo, else the free pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        raise RuntimeError("max_memory: cannot read the available memory here; give max_memory= explicitly") from None


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_memory(value, arg: str = "max_memory") -> int:
    """Bytes from an int/float (bytes) or a string such as "8G", "512MiB", "1.5GB" (binary units)."""
    if isinstance(value, bool):
        raise TypeError(f"{arg}: expected bytes (an int) or a size such as '8G', got {value!r}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"{arg}: expected a positive number of bytes, got {value!r}")
        return int(value)
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?[bB])?\s*", value)
        if m and float(m.group(1)) > 0:
            return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
        raise ValueError(f"{arg}: expected a size such as '8G', '512M' or '1.5GiB', got {value!r}")
    raise TypeError(f"{arg}: expected bytes (an int) or a size such as '8G', got {type(value).__name__}")


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


@dataclass
class LayerMemory:
    """One layer's statistics in the plan."""

    name: str
    features: int  # calibration row length (in_features, or in_channels * kh * kw)
    outputs: int
    representation: str  # "exact", "exact-fp32", "kronecker" or "none"
    stats_bytes: int  # the accumulators
    fit_bytes: int  # the fit's temporaries
    rows_bytes: int  # one chunk of calibration rows
    exact_bytes: int  # stats + fit with the exact float64 representation (what it would have needed)
    chunk_rows: int  # calibration rows per accumulator update
    kronecker: tuple | None = None  # (channels, offsets) of a conv's patch
    project: bool = False  # the cross statistics kept only times the layer's weight

    @property
    def bytes(self) -> int:
        return self.stats_bytes + self.fit_bytes + self.rows_bytes

    @property
    def approximation(self) -> str:
        return APPROXIMATIONS[self.representation]

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32 if self.representation == "exact-fp32" else torch.float64


@dataclass
class MemoryPlan:
    """Per-layer representations and the estimated peak, against ``budget`` bytes."""

    budget: int
    budget_source: str  # "max_memory" or "50% of MemAvailable (...)"
    layers: dict = field(default_factory=dict)  # {name: LayerMemory}
    peak: int = 0  # estimated peak bytes of statistics, fits and row chunks
    total: int = 0  # every layer's stats + fit + rows summed
    concurrent: bool = False  # every layer's statistics are held at once (one-shot / rank rule)

    def lines(self) -> list[str]:
        approx = [m for m in self.layers.values() if m.representation not in ("exact", "none")]
        head = (
            f"memory plan: estimated peak {format_bytes(self.peak)} of statistics and fits "
            f"(all layers {format_bytes(self.total)}) within {format_bytes(self.budget)} ({self.budget_source})"
        )
        out = [head]
        for m in approx:
            out.append(
                f"statistics of {m.name!r}: {m.representation} ({m.approximation}); {format_bytes(m.bytes)} "
                f"instead of {format_bytes(m.exact_bytes)} exact"
            )
        return out

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = {
            n: {**asdict(m), "bytes": m.bytes, "approximation": m.approximation} for n, m in self.layers.items()
        }
        return d


def kronecker_shape(layer: nn.Module) -> tuple[int, int] | None:
    """(channels, offsets) of a conv's patch rows (channel-major), None for other layers."""
    if isinstance(layer, nn.Conv2d):
        return (layer.in_channels, layer.kernel_size[0] * layer.kernel_size[1])
    return None


def narrows(layer: nn.Module) -> bool:
    """The layer's output is under half its row length: its statistics keep the cross product
    only times its weight (fewer FLOPs and bytes; see GramStats project=)."""
    shape = cast(torch.Tensor, layer.weight).shape
    out = shape[0]
    features = math.prod(shape[1:])
    return 2 * out < features


def _estimate(layer, rep: str, paired: bool, project: bool, keep_rows: int, reference: bool, chunk: int):
    """(stats bytes, fit bytes, rows bytes, chunk rows) of one layer's statistics."""
    out = layer.weight.shape[0]
    d = math.prod(layer.weight.shape[1:])
    if rep == "none":
        return 0, 0, 0, 0
    e = 4 if rep == "exact-fp32" else 8
    vec = 4 * d * 8
    proj = d * out * 8 + out * out * 8
    if rep == "kronecker":
        kron = kronecker_shape(layer)
        # plan_memory allows "kronecker" only where the layer has a patch shape
        assert kron is not None
        c, k = kron
        stats = (c * c + k * k) * 8 + proj + vec + (d * out * 8 if paired else 0)
        fit = FIT_KERNEL_MATRICES * d * out * 8 + 2 * (c * c + k * k) * 8
    elif not paired:
        stats = d * d * e + (proj if project else 0) + vec
        fit = EXACT_FIT_MATRICES * d * d * 8 + FIT_KERNEL_MATRICES * d * out * 8
    else:
        stats = d * d * e + vec + (proj if project else d * d * 8 + (0 if reference else d * d * e))
        fit = EXACT_FIT_MATRICES * d * d * 8 + FIT_KERNEL_MATRICES * d * out * 8
    stats += 2 * keep_rows * d * 8
    # a chunk's float32 rows, for each of X and X~: the unfold, its transposed copy, the shifted copy
    per_row = 4 * d * (6 if paired else 3)
    rows = max(1, chunk // per_row)
    return stats, fit, rows * per_row, rows


def plan_memory(
    layers: dict,
    methods: dict,
    structure: str,
    budget: int,
    budget_source: str,
    sequential: bool,
    one_shot: bool,
    keep_rows: int = 0,
    folds: int = 0,
) -> MemoryPlan:
    """The plan for ``layers`` ({name: module}) fitted by ``methods`` ({name: method};
    "svd" or None: no statistics). ``sequential``: paired statistics, one stage at a time;
    ``one_shot``: one-shot statistics of every layer held at once (one-shot methods and rank
    rules; with ``sequential`` too, the stage's paired statistics borrow their X^T X).
    ``folds``: rank_rule="cv" keeps per-fold one-shot statistics too (folds + 1 sets, merged,
    so exact or float32 only)."""
    chunk = int(min(CHUNK_MAX_BYTES, max(CHUNK_MIN_BYTES, budget // 16)))
    plan = MemoryPlan(budget=budget, budget_source=budget_source, concurrent=one_shot)
    reps: dict[str, str] = {}
    allowed: dict[str, tuple[str, ...]] = {}
    for name, layer in layers.items():
        method = methods.get(name)
        if method in (None, "svd") and not one_shot:
            reps[name], allowed[name] = "none", ("none",)
            continue
        kron_ok = (
            structure in ("tucker", "cp")
            and kronecker_shape(layer) is not None
            and method in ("activation", "whitened", "svd", None)
            and not folds
        )
        allowed[name] = _STEPS if kron_ok else _STEPS[:2]
        reps[name] = "exact"

    def layer_memory(name):
        layer, rep = layers[name], reps[name]
        method = methods.get(name)
        keep = keep_rows if method in ("convex", "relu", "gelu") else 0
        kron = rep == "kronecker"
        proj_seq = kron or (method == "activation" and not keep and narrows(layer))
        shot = (0, 0, 0, 0)
        if one_shot and rep != "none":
            shot = _estimate(layer, rep, False, kron, 0, False, chunk)
            shot = (shot[0] * (folds + 1 if folds else 1),) + shot[1:]
        seq = (0, 0, 0, 0)
        if sequential and rep != "none":
            seq = _estimate(layer, rep, True, proj_seq, keep, one_shot, chunk)
        exact = 0
        if rep != "none":
            e1 = _estimate(layer, "exact", False, False, 0, False, chunk) if one_shot else (0, 0, 0, 0)
            e2 = (
                _estimate(layer, "exact", True, method == "activation" and narrows(layer), keep, one_shot, chunk)
                if sequential
                else (0, 0, 0, 0)
            )
            exact = e1[0] + e2[0] + max(e1[1], e2[1]) + max(e1[2], e2[2])
        return (
            LayerMemory(
                name=name,
                features=math.prod(layer.weight.shape[1:]),
                outputs=layer.weight.shape[0],
                representation=rep,
                stats_bytes=shot[0] + seq[0],
                fit_bytes=max(shot[1], seq[1]),
                rows_bytes=max(shot[2], seq[2]),
                exact_bytes=exact,
                chunk_rows=max(shot[3], seq[3]),
                kronecker=kronecker_shape(layer) if kron else None,
                project=bool(proj_seq) and sequential,
            ),
            shot,
            seq,
        )

    def peak():
        mems = {n: layer_memory(n) for n in layers}
        if not mems:
            return 0, {}
        held = sum(s[0] for _, s, _ in mems.values())  # one-shot statistics: all at once
        # one layer's paired statistics, fit and row chunk on top (stages run one at a time)
        top = max(seq[0] + m.fit_bytes + m.rows_bytes for m, _, seq in mems.values())
        return held + top, {n: m for n, (m, _, _) in mems.items()}

    while True:
        est, mems = peak()
        if est <= budget:
            break
        # step down the layer that needs the most and still has a smaller representation
        cands = [n for n in mems if allowed[n].index(reps[n]) + 1 < len(allowed[n])]
        if not cands:
            worst = max(mems.values(), key=lambda m: m.bytes)
            layer = layers[worst.name]
            kind = type(layer).__name__
            tried = " / ".join(allowed[worst.name])
            raise MemoryPlanError(
                f"max_memory: layer {worst.name!r} ({kind}, {worst.features:,} input features per calibration row, "
                f"{worst.outputs:,} outputs) needs an estimated {format_bytes(worst.bytes)} for its calibration "
                f"statistics and fit even as {worst.representation!r} ({worst.approximation}); all layers together "
                f"an estimated {format_bytes(est)}; the budget is {format_bytes(budget)} ({budget_source}). "
                f"Representations tried: {tried}. Options: a larger max_memory= (--max-memory), "
                f"exclude=[{worst.name!r}] to leave the layer dense, method='svd' (weights only, no statistics)"
                + (", or structure='tucker'/'cp' (Kronecker-factored conv statistics)" if structure == "tt" else "")
                + (", or no rank_rule (one-shot statistics of every layer are held at once)" if one_shot else "")
            )
        big = max(cands, key=lambda n: mems[n].bytes)
        reps[big] = allowed[big][allowed[big].index(reps[big]) + 1]
    plan.layers = mems
    plan.peak = est
    plan.total = sum(m.bytes for m in mems.values())
    return plan
