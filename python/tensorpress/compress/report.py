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
    shape: tuple[int, int]  # (out_features, in_features)
    rank: int
    params_before: int
    params_after: int
    flops_before: int  # multiply-adds per sample (per token)
    flops_after: int
    # ||y - y^|| / ||y|| of the layer's outputs on the calibration data (one-shot methods: on the
    # original model's inputs; sequential ones: y^ on the compressed model's inputs); for a
    # layer called several times per forward pass, the worst of its calls
    rel_error: float
    seconds: float
    calls: int = 1  # calls per forward pass (a module applied more than once)
    call_errors: list = field(default_factory=list)  # rel_error of each call, measured, when calls > 1
    aliases: list = field(default_factory=list)  # the module's other names (registered at several places)
    # calibration rows the layer's statistics hold: its input vectors over the whole calibration
    # set (a token of a Linear, an output position of an image for a conv; every call counted)
    rows: int = 0
    # how its calibration statistics were kept (compress.memory): "exact" (float64 Gram),
    # "exact-fp32", "kronecker" (channels x offsets factored patch covariance) or "none"
    statistics: str = "exact"

    @property
    def rank_text(self) -> str:
        """The rank as the table shows it: "dense" for a layer kept dense, so no bare full rank
        stands next to a structure's (r_out, r_in) or bond ranks."""
        return "dense" if self.structure == "dense" else str(self.rank)


# what compress() did with a layer (LayerAccount.status)
COMPRESSED, KEPT_DENSE, SKIPPED, EXCLUDED = "compressed", "kept dense", "skipped", "excluded"
STATUSES = (COMPRESSED, KEPT_DENSE, SKIPPED, EXCLUDED)


@dataclass
class LayerAccount:
    """One nn.Linear / conv layer of the model and what compress() did with it, and why."""

    name: str
    kind: str  # e.g. "Conv2d(1->8, 3x3)"
    status: str  # one of STATUSES
    why: str
    aliases: list = field(default_factory=list)


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
    mode: str = ""  # "blocks" (block replay) or "model" (whole-model passes) or "one-shot"
    quality: dict = field(default_factory=dict)  # filled by the caller (accuracy, cosine, ...)
    residual_feedback: list = field(default_factory=list)  # layers fitted to make up for the residual error
    skipped: dict = field(default_factory=dict)  # {layer: why it was left dense} (tied weights)
    notes: list = field(default_factory=list)  # how the run departed from its defaults, and why
    # {BatchNorm name: conv name} folded by fold_batchnorm=True (a FoldedBatchNorm in its place)
    folded_batchnorm: dict = field(default_factory=dict)
    # every nn.Linear / conv layer of the model, in model order: compressed, kept dense, skipped
    # (with the reason; tied weights too) or excluded by include/exclude
    account: list[LayerAccount] = field(default_factory=list)
    # the memory plan (compress.memory.MemoryPlan.to_dict()): budget, estimated peak, and per
    # layer the representation of its statistics, its approximation and the bytes estimated
    memory: dict = field(default_factory=dict)
    memory_lines: list = field(default_factory=list)  # the plan in words (budget, approximated layers)

    def account_counts(self) -> dict[str, int]:
        return {s: sum(a.status == s for a in self.account) for s in STATUSES}

    def account_line(self) -> str:
        counts = ", ".join(f"{n} {s}" for s, n in self.account_counts().items())
        return f"every Linear/conv layer of the model ({len(self.account)}): {counts}"

    def account_table(self, fmt: str = "text") -> str:
        head = ["layer", "type", "status", "why"]
        rows = [[a.name + "".join(f" = {x}" for x in a.aliases), a.kind, a.status, a.why] for a in self.account]
        return _format_table(head, rows, fmt, right=())

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
        first = self.layers[0].name if self.layers else None
        rows = (
            f"calibration rows={self.calibration_rows:,} (the inputs {first!r} saw over the calibration set; "
            f"each layer's own in the 'rows' column)"
            if first
            else f"calibration rows={self.calibration_rows:,}"
        )
        lines = [
            f"structure={self.structure} method={self.method} budget={self.budget} rank_rule={self.rank_rule} "
            f"mode={self.mode} time={self.seconds:.1f}s",
            rows,
            f"compressed layers: {len(self.layers)}, their parameters {self.layer_params_before:,} -> "
            f"{self.layer_params_after:,} ({100 * self.kept_fraction:.1f}% kept)",
            f"model parameters {self.model_params_before:,} -> {self.model_params_after:,}; "
            f"state_dict {self.bytes_before / mb:.2f} MiB -> {self.bytes_after / mb:.2f} MiB",
        ]
        # tied layers up front too (the account lists them with the others)
        lines += [f"skipped {name}: {why}" for name, why in self.skipped.items()]
        if self.folded_batchnorm:
            pairs = ", ".join(f"{bn} -> {conv}" for bn, conv in self.folded_batchnorm.items())
            lines.append(f"BatchNorm folded into the conv before it (an identity in its place; same outputs): {pairs}")
        lines += self.memory_lines
        lines += self.notes
        for k, v in self.quality.items():
            lines.append(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
        return lines

    def table(self, fmt: str = "text") -> str:
        head = ["layer", "shape", "rank", "params", "kept %", "MACs/row", "rows", "stats", "rel err", "s"]
        rows = []
        for r in self.layers:
            name = r.name + "".join(f" = {a}" for a in r.aliases) + (f" (x{r.calls} calls)" if r.calls > 1 else "")
            rows.append(
                [
                    name,
                    f"{r.shape[0]}x{r.shape[1]}",
                    r.rank_text,
                    f"{r.params_after:,}",
                    f"{100 * r.params_after / r.params_before:.1f}",
                    f"{r.flops_after:,}",
                    f"{r.rows:,}",
                    r.statistics,
                    f"{r.rel_error:.4f}",
                    f"{r.seconds:.2f}",
                ]
            )
        return _format_table(head, rows, fmt, right=range(1, len(head)))

    def _account_section(self, fmt: str) -> list[str]:
        if not self.account:
            return []
        head = ["", "## Every layer accounted for"] if fmt == "markdown" else []
        return head + ["", self.account_line() + ":", "", self.account_table(fmt)]

    def __str__(self) -> str:
        return "\n".join(self.summary_lines() + [self.table()] + self._account_section("text"))

    def to_markdown(self, path=None) -> str:
        text = "\n".join(
            ["# Compression report", ""]
            + [f"- {line}" for line in self.summary_lines()]
            + ["", self.table("markdown")]
            + self._account_section("markdown")
            + [""]
        )
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


def _format_table(head: list[str], rows: list[list[str]], fmt: str, right) -> str:
    """A markdown table, or aligned text with the columns ``right`` right-justified."""
    if fmt == "markdown":
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
        return "\n".join(out)
    right = set(right)
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]

    def fmt_row(row):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    return "\n".join([fmt_row(head)] + [fmt_row(row) for row in rows])


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def state_dict_bytes(model: nn.Module) -> int:
    """Size of the model's state_dict as torch.save writes it."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()
