"""The compression report: per layer and for the whole model, as text, JSON, markdown, PNG."""
from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field

import torch
from torch import nn


@dataclass
class LayerReport:
    name: str
    structure: str
    method: str
    shape: tuple[int, int]          # (out_features, in_features)
    rank: int
    params_before: int
    params_after: int
    flops_before: int               # multiply-adds per sample (per token)
    flops_after: int
    # ||y - y^|| / ||y|| of the layer's outputs on the calibration data (one-shot methods: on the
    # original model's inputs; sequential ones: y^ on the compressed model's inputs); for a
    # layer called several times per forward pass, the worst of its calls
    rel_error: float
    seconds: float
    calls: int = 1                  # calls per forward pass (a module applied more than once)
    call_errors: list = field(default_factory=list)   # rel_error of each call, measured, when calls > 1
    aliases: list = field(default_factory=list)       # the module's other names (registered at several places)


@dataclass
class CompressionReport:
    layers: list[LayerReport] = field(default_factory=list)
    structure: str = ""
    method: str = ""
    budget: float | None = None
    rank_rule: str | None = None
    model_params_before: int = 0
    model_params_after: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    calibration_rows: int = 0
    seconds: float = 0.0
    rank_rule_seconds: float = 0.0  # time the rank rule took to choose the ranks (fits, sensitivities)
    mode: str = ""                  # "blocks" (block replay) or "model" (whole-model passes) or "one-shot"
    quality: dict = field(default_factory=dict)   # filled by the caller (accuracy, cosine, ...)
    residual_feedback: list = field(default_factory=list)   # layers fitted to make up for the residual error
    skipped: dict = field(default_factory=dict)   # {layer: why it was left dense} (tied weights)
    notes: list = field(default_factory=list)     # how the run departed from its defaults, and why

    @property
    def layer_params_before(self) -> int:
        return sum(r.params_before for r in self.layers)

    @property
    def layer_params_after(self) -> int:
        return sum(r.params_after for r in self.layers)

    @property
    def kept_fraction(self) -> float:
        """Parameters of the compressed layers after / before."""
        before = self.layer_params_before
        return self.layer_params_after / before if before else 1.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["kept_fraction"] = self.kept_fraction
        return d

    def to_json(self, path=None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            with open(path, "w") as f:
                f.write(text + "\n")
        return text

    def summary_lines(self) -> list[str]:
        mb = 1024 * 1024
        lines = [f"structure={self.structure} method={self.method} budget={self.budget} rank_rule={self.rank_rule} "
                 f"mode={self.mode} calibration rows={self.calibration_rows} time={self.seconds:.1f}s",
                 f"compressed layers: {len(self.layers)}, their parameters {self.layer_params_before:,} -> "
                 f"{self.layer_params_after:,} ({100 * self.kept_fraction:.1f}% kept)",
                 f"model parameters {self.model_params_before:,} -> {self.model_params_after:,}; "
                 f"state_dict {self.bytes_before / mb:.2f} MiB -> {self.bytes_after / mb:.2f} MiB"]
        for name, why in self.skipped.items():
            lines.append(f"skipped {name}: {why}")
        lines += self.notes
        for k, v in self.quality.items():
            lines.append(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
        return lines

    def table(self, fmt: str = "text") -> str:
        head = ["layer", "shape", "rank", "params", "kept %", "MACs/row", "rel err", "s"]
        rows = []
        for r in self.layers:
            name = r.name + "".join(f" = {a}" for a in r.aliases) + (f" (x{r.calls} calls)" if r.calls > 1 else "")
            rows.append([name, f"{r.shape[0]}x{r.shape[1]}", str(r.rank), f"{r.params_after:,}",
                         f"{100 * r.params_after / r.params_before:.1f}", f"{r.flops_after:,}",
                         f"{r.rel_error:.4f}", f"{r.seconds:.2f}"])
        if fmt == "markdown":
            out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            out += ["| " + " | ".join(row) + " |" for row in rows]
            return "\n".join(out)
        widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
        fmt_row = lambda row: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                        for i, (c, w) in enumerate(zip(row, widths)))
        return "\n".join([fmt_row(head)] + [fmt_row(row) for row in rows])

    def __str__(self) -> str:
        return "\n".join(self.summary_lines() + [self.table()])

    def to_markdown(self, path=None) -> str:
        text = "\n".join(["# Compression report", ""] + [f"- {line}" for line in self.summary_lines()]
                         + ["", self.table("markdown"), ""])
        if path is not None:
            with open(path, "w") as f:
                f.write(text)
        return text

    def plot(self, path) -> str:
        """PNG: per layer, the fraction of parameters kept and the relative output error."""
        import matplotlib
        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        names = [r.name for r in self.layers]
        kept = [r.params_after / r.params_before for r in self.layers]
        err = [r.rel_error for r in self.layers]
        fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(names) + 2), 4.5))
        x = range(len(names))
        ax.bar(x, kept, color="tab:blue", alpha=0.6, label="parameters kept")
        ax.set_ylabel("fraction of parameters kept")
        ax.set_xticks(list(x), names, rotation=90, fontsize=6)
        ax2 = ax.twinx()
        ax2.plot(list(x), err, "o-", color="tab:red", label="relative output error")
        ax2.set_ylabel("relative output error (calibration)")
        ax.set_title(f"{self.structure}/{self.method}: {100 * self.kept_fraction:.0f}% of layer parameters kept")
        fig.legend(loc="upper right")
        fig.tight_layout()
        fig.savefig(str(path), dpi=120)
        plt.close(fig)
        return str(path)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def state_dict_bytes(model: nn.Module) -> int:
    """Size of the model's state_dict as torch.save writes it."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()
