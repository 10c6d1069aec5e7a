"""Streaming second-moment statistics of a layer's calibration inputs.

For a layer y = x W^T + b, X holds the inputs the ORIGINAL model feeds it and X~ those of the
model compressed so far (X~ = X when nothing before it changed), one row per sample. Every
data-aware fit needs only means and the Gram matrices X~^T X~, X~^T X and X^T X, so they are
accumulated batch by batch and memory never grows with the number of samples.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _work_dtype(x: Tensor) -> torch.dtype:
    """The precision batch products are formed in: fp16/bf16 inputs are promoted to fp32."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


# Gram matrices wider than two panels are accumulated as their upper block triangle, one
# row panel at a time (x_i^T x[:, i:]): 10 of 16 blocks at four panels, and the panel
# products run about as fast per FLOP as one whole product
GRAM_PANEL = 384


def _add_gram(acc: Tensor, x: Tensor) -> None:
    """acc += x^T x, where acc holds the upper block triangle (see _mirror)."""
    d = x.shape[1]
    if d < 2 * GRAM_PANEL:
        acc += (x.T @ x).to(torch.float64)
        return
    for lo in range(0, d, GRAM_PANEL):
        hi = min(lo + GRAM_PANEL, d)
        acc[lo:hi, lo:] += (x[:, lo:hi].T @ x[:, lo:]).to(torch.float64)


def _mirror(acc: Tensor) -> Tensor:
    """The whole symmetric matrix from _add_gram's upper block triangle."""
    d = acc.shape[0]
    if d < 2 * GRAM_PANEL:
        return acc
    full = acc + acc.T
    for lo in range(0, d, GRAM_PANEL):  # the diagonal blocks were whole, so they were doubled
        hi = min(lo + GRAM_PANEL, d)
        full[lo:hi, lo:hi] = acc[lo:hi, lo:hi]
    return full


class GramStats:
    """Running means and centered Gram matrices of paired inputs (X, X~), in float64.

    Each batch is shifted by a fixed reference point (the first batch's mean) before its
    products are formed in the input's precision, so large common offsets (transformer hidden
    states have them) do not cancel catastrophically, and the batch products are added into
    float64 accumulators.

    Args:
        in_features: the row length.
        paired: False when X~ = X (one-shot statistics): then only X^T X is kept.
        keep_rows: keep up to this many (X, X~) rows (a uniform subsample of the first
            batches) for methods that need samples, not moments (the ReLU-aware fit).
        reference: one-shot statistics of the very same X rows (the original model's inputs
            to this layer, from the same batches), whose X^T X is then used instead of being
            accumulated again (a third of the work of a paired update).
        project: the weight W (out, in) of the one layer these statistics serve, for paired
            statistics: X~^T X is then kept only as X~^T X W^T (in, out), which is all a fit
            of that layer reads (see cov_cross_times), at out/in of the cost.
    """

    def __init__(
        self,
        in_features: int,
        paired: bool = True,
        keep_rows: int = 0,
        reference: GramStats | None = None,
        project: Tensor | None = None,
    ) -> None:
        self.in_features, self.paired, self.keep_rows = in_features, paired, keep_rows
        if reference is not None and (not paired or reference.in_features != in_features):
            raise ValueError("reference: expected one-shot statistics of the same features for paired statistics")
        if project is not None and (not paired or project.dim() != 2 or project.shape[1] != in_features):
            raise ValueError(
                f"project: expected a weight (out, {in_features}) for paired statistics, got "
                f"{tuple(project.shape) if project is not None else None}"
            )
        self.project = None if project is None else project.detach().to(torch.float64)
        self.reference = reference
        self._upper = False  # True while the Grams hold upper block triangles (see _add_gram)
        self.n = 0
        self._shift_ref: Tensor | None = None
        self._shift_in: Tensor | None = None
        self._sum_ref = self._sum_in = None
        self._gram_ref = self._gram_in = self._cross = None
        self.rows_ref: list[Tensor] = []
        self.rows_in: list[Tensor] = []
        self._kept = 0

    def update(self, x_ref: Tensor, x_in: Tensor | None = None) -> None:
        """Add rows: x_ref (rows, in) from the original model and x_in (rows, in) from the
        compressed one (ignored, and may be None, when not paired)."""
        x_ref = x_ref.detach().reshape(-1, self.in_features)
        x_in = x_ref if not self.paired or x_in is None else x_in.detach().reshape(-1, self.in_features)
        if x_in.shape != x_ref.shape:
            raise ValueError(f"x_in: expected the shape of x_ref {tuple(x_ref.shape)}, got {tuple(x_in.shape)}")
        if x_ref.shape[0] == 0:
            return
        work = _work_dtype(x_ref)
        x_ref, x_in = x_ref.to(work), x_in.to(work)
        if self._shift_ref is None:
            self._shift_ref = x_ref.mean(0)
            self._shift_in = x_in.mean(0)
            d = self.in_features
            zeros = lambda *s: torch.zeros(*s, dtype=torch.float64, device=x_ref.device)  # noqa: E731
            self._sum_ref, self._sum_in = zeros(d), zeros(d)
            self._gram_ref = zeros(d, d) if self.reference is None else None
            if self.paired:
                self._gram_in = zeros(d, d)
                self._cross = zeros(d, d) if self.project is None else zeros(d, self.project.shape[0])
            self._upper = True  # the Grams hold upper block triangles until first read
        # rows added after a read go into the whole matrices
        add_gram = _add_gram if self._upper else (lambda acc, x: acc.add_((x.T @ x).to(torch.float64)))
        a = x_ref - self._shift_ref
        self._sum_ref += a.sum(0, dtype=torch.float64)
        if self.reference is None:
            add_gram(self._gram_ref, a)
        if self.paired:
            b = x_in - self._shift_in
            self._sum_in += b.sum(0, dtype=torch.float64)
            add_gram(self._gram_in, b)
            if self.project is None:
                self._cross += (b.T @ a).to(torch.float64)
            else:
                self._cross += (b.T @ (a @ self.project.to(device=a.device, dtype=a.dtype).T)).to(torch.float64)
        self.n += x_ref.shape[0]
        if self._kept < self.keep_rows:
            take = min(self.keep_rows - self._kept, x_ref.shape[0])
            idx = torch.randperm(x_ref.shape[0], device=x_ref.device)[:take]
            self.rows_ref.append(x_ref[idx].to(torch.float64))
            self.rows_in.append(x_in[idx].to(torch.float64))
            self._kept += take

    def _require_data(self):
        if self.n == 0:
            raise ValueError("calibration data: no rows reached this layer")
        self._whole()

    def _whole(self) -> None:
        """Turn the Grams' upper block triangles into whole matrices (once, at first read)."""
        if self.n and self._upper:
            if self._gram_ref is not None:
                self._gram_ref = _mirror(self._gram_ref)
            if self.paired:
                self._gram_in = _mirror(self._gram_in)
            self._upper = False

    @property
    def mean_ref(self) -> Tensor:
        """Mean of the X rows (in,)."""
        self._require_data()
        return self._shift_ref.to(torch.float64) + self._sum_ref / self.n

    @property
    def mean_in(self) -> Tensor:
        """Mean of the X~ rows (in,)."""
        if not self.paired:
            return self.mean_ref
        self._require_data()
        return self._shift_in.to(torch.float64) + self._sum_in / self.n

    def _centered(self, gram: Tensor, sum_a: Tensor, sum_b: Tensor) -> Tensor:
        # sum (a - mean_a)(b - mean_b)^T from the shifted sums: G - s_a s_b^T / n
        return gram - torch.outer(sum_a, sum_b) / self.n

    @property
    def cov_ref(self) -> Tensor:
        """Centered X^T X (in, in): sum over rows of (x - mean)(x - mean)^T."""
        self._require_data()
        if self.reference is not None:
            if self.reference.n != self.n:
                raise RuntimeError(f"reference: its statistics cover {self.reference.n} rows, these {self.n}")
            return self.reference.cov_ref
        return self._centered(self._gram_ref, self._sum_ref, self._sum_ref)

    @property
    def cov_in(self) -> Tensor:
        """Centered X~^T X~ (in, in)."""
        if not self.paired:
            return self.cov_ref
        self._require_data()
        return self._centered(self._gram_in, self._sum_in, self._sum_in)

    @property
    def cov_cross(self) -> Tensor:
        """Centered X~^T X (in, in)."""
        if not self.paired:
            return self.cov_ref
        self._require_data()
        if self.project is not None:
            raise ValueError("stats: X~^T X was kept only times the layer's weight (project=); use cov_cross_times")
        return self._centered(self._cross, self._sum_in, self._sum_ref)

    def cov_cross_times(self, weight: Tensor) -> Tensor:
        """Centered X~^T X W^T (in, out) for the layer's weight W (out, in), float64."""
        w = weight.detach().to(torch.float64)
        if self.project is None:
            return self.cov_cross.to(w.device) @ w.T
        self._require_data()
        if w.shape != self.project.shape or not torch.equal(w.to(self.project.device), self.project):
            raise ValueError(
                f"weight: these statistics keep X~^T X only times the weight they were projected on "
                f"{tuple(self.project.shape)}; expected that weight"
            )
        centered = self._cross - torch.outer(self._sum_in, self.project @ self._sum_ref) / self.n
        return centered.to(w.device)

    def gram_in(self) -> Tensor:
        """Uncentered X~^T X~."""
        m = self.mean_in
        return self.cov_in + self.n * torch.outer(m, m)

    def cross(self) -> Tensor:
        """Uncentered X~^T X (unavailable for statistics made with project=)."""
        return self.cov_cross + self.n * torch.outer(self.mean_in, self.mean_ref)

    def samples(self) -> tuple[Tensor, Tensor]:
        """The kept (X, X~) rows, float64."""
        if not self.rows_ref:
            raise ValueError("keep_rows: no rows were kept (construct GramStats with keep_rows > 0)")
        return torch.cat(self.rows_ref), torch.cat(self.rows_in)

    def merge_(self, other: GramStats) -> GramStats:
        """Add another accumulator's rows into this one (for multi-process reduction)."""
        if self.reference is not None or other.reference is not None:
            raise ValueError("other: statistics that borrow a reference X^T X cannot be merged")
        if self.project is not None or other.project is not None:
            raise ValueError("other: statistics made with project= cannot be merged")
        if other.n == 0:
            return self
        self._whole()
        other._whole()
        if self.n == 0:
            self.__dict__.update({k: (v.clone() if isinstance(v, Tensor) else v) for k, v in other.__dict__.items()})
            self.rows_ref, self.rows_in = list(other.rows_ref), list(other.rows_in)
            return self

        # re-express the other's sums about this accumulator's shifts: with d = shift_o - shift,
        # sum (a + d_a)(b + d_b)^T = G + s_a d_b^T + d_a s_b^T + n d_a d_b^T
        def moved(gram, s_a, s_b, d_a, d_b):
            return gram + torch.outer(s_a, d_b) + torch.outer(d_a, s_b) + other.n * torch.outer(d_a, d_b)

        d_ref = (other._shift_ref - self._shift_ref).to(torch.float64)
        self._gram_ref += moved(other._gram_ref, other._sum_ref, other._sum_ref, d_ref, d_ref)
        if self.paired:
            d_in = (other._shift_in - self._shift_in).to(torch.float64)
            self._gram_in += moved(other._gram_in, other._sum_in, other._sum_in, d_in, d_in)
            self._cross += moved(other._cross, other._sum_in, other._sum_ref, d_in, d_ref)
            self._sum_in += other._sum_in + other.n * d_in
        self._sum_ref += other._sum_ref + other.n * d_ref
        self.n += other.n
        self.rows_ref += other.rows_ref
        self.rows_in += other.rows_in
        return self

    def all_reduce_(self) -> GramStats:
        """Sum the statistics of every process of the torch.distributed group (all processes
        call it; afterwards each holds the totals). Kept rows are concatenated in rank order."""
        from tensorpress.compress import distributed as tpdist

        if not tpdist.active():
            return self
        self._whole()
        d = self.in_features
        f64 = torch.float64
        dev = self._sum_ref.device if self.n else torch.device("cpu")
        proj = self.project  # the cross product's ref side is kept times W^T: move it through W too
        wt = (lambda v: v) if proj is None else (lambda v: proj.to(v.device) @ v)  # noqa: E731
        cross_cols = d if proj is None else proj.shape[0]
        zero_vec = torch.zeros(d, dtype=f64, device=dev)
        # 1. the global means become the common shift (the best-conditioned one)
        s_ref = (self._shift_ref.to(f64) * self.n + self._sum_ref) if self.n else zero_vec
        s_in = (self._shift_in.to(f64) * self.n + self._sum_in) if (self.n and self.paired) else zero_vec
        n_t, s_ref, s_in = tpdist.sum_tensors([torch.tensor([float(self.n)], dtype=f64), s_ref, s_in])
        total = int(n_t.item())
        if total == 0:
            return self
        mu_ref, mu_in = s_ref / total, (s_in / total if self.paired else None)

        # 2. this process's sums re-expressed about the common shift: with d = shift - mu,
        #    sum (a + d_a)(b + d_b)^T = G + s_a d_b^T + d_a s_b^T + n d_a d_b^T
        def moved(gram, s_a, s_b, d_a, d_b):
            return gram + torch.outer(s_a, d_b) + torch.outer(d_a, s_b) + self.n * torch.outer(d_a, d_b)

        zeros = torch.zeros(d, d, dtype=f64, device=dev)
        parts = []
        if self.n:
            d_ref = self._shift_ref.to(f64) - mu_ref
            parts += [
                self._sum_ref + self.n * d_ref,
                zeros if self._gram_ref is None else moved(self._gram_ref, self._sum_ref, self._sum_ref, d_ref, d_ref),
            ]
            if self.paired:
                d_in = self._shift_in.to(f64) - mu_in
                parts += [
                    self._sum_in + self.n * d_in,
                    moved(self._gram_in, self._sum_in, self._sum_in, d_in, d_in),
                    moved(self._cross, self._sum_in, wt(self._sum_ref), d_in, wt(d_ref)),
                ]
        else:
            parts += [zero_vec, zeros] + (
                [zero_vec, zeros, torch.zeros(d, cross_cols, dtype=f64, device=dev)] if self.paired else []
            )
        parts = tpdist.sum_tensors(parts)
        self._sum_ref, gram_ref = parts[0], parts[1]
        self._gram_ref = None if self.reference is not None else gram_ref
        if self.paired:
            self._sum_in, self._gram_in, self._cross = parts[2], parts[3], parts[4]
        self._shift_ref, self._shift_in = mu_ref, (mu_in if self.paired else mu_ref)
        self.n = total
        self._upper = False
        if self.keep_rows:
            rows = tpdist.gather_objects((self.rows_ref, self.rows_in))
            self.rows_ref = [t for r, _ in rows for t in r]
            self.rows_in = [t for _, i in rows for t in i]
            self._kept = sum(t.shape[0] for t in self.rows_ref)
        return self


class OffsetStats:
    """Statistics of a correction added to a layer's target: rows of X~ (the compressed model's
    inputs to the layer) paired with rows of D (rows, out), the amount the layer's output
    should also make up for (the residual-stream error, see
    :func:`tensorpress.compress.calibrate.residual_partners`). Keeps the mean of D and the
    centered cross product X~c^T Dc (in, out), in float64."""

    def __init__(self, in_features: int, out_features: int) -> None:
        self.in_features, self.out_features = in_features, out_features
        self.n = 0
        self._shift: Tensor | None = None
        self._sum_x = self._sum_d = self._cross = None

    def update(self, x_in: Tensor, d: Tensor) -> None:
        x_in = x_in.detach().reshape(-1, self.in_features)
        d = d.detach().reshape(-1, self.out_features)
        if x_in.shape[0] != d.shape[0]:
            raise ValueError(f"d: expected {x_in.shape[0]} rows (one per input row), got {d.shape[0]}")
        if x_in.shape[0] == 0:
            return
        work = _work_dtype(x_in)
        x_in, d = x_in.to(work), d.to(work)
        if self._shift is None:
            self._shift = x_in.mean(0).to(torch.float64)
            zeros = lambda *s: torch.zeros(*s, dtype=torch.float64, device=x_in.device)  # noqa: E731
            self._sum_x, self._sum_d = zeros(self.in_features), zeros(self.out_features)
            self._cross = zeros(self.in_features, self.out_features)
        b = x_in - self._shift.to(work)
        self._sum_x += b.sum(0, dtype=torch.float64)
        self._sum_d += d.sum(0, dtype=torch.float64)
        self._cross += (b.T @ d).to(torch.float64)
        self.n += x_in.shape[0]

    @property
    def mean_d(self) -> Tensor:
        if self.n == 0:
            raise ValueError("calibration data: no rows reached this layer")
        return self._sum_d / self.n

    @property
    def cov_cross(self) -> Tensor:
        """Centered X~^T D (in, out)."""
        if self.n == 0:
            raise ValueError("calibration data: no rows reached this layer")
        return self._cross - torch.outer(self._sum_x, self._sum_d) / self.n

    def all_reduce_(self) -> OffsetStats:
        """Sum over the processes of the torch.distributed group (a no-op without one)."""
        from tensorpress.compress import distributed as tpdist

        if not tpdist.active():
            return self
        f64, d_in, d_out = torch.float64, self.in_features, self.out_features
        if self.n:  # uncentered sums (shift 0): sum x, sum d, sum x d^T
            sum_x = self._sum_x + self.n * self._shift
            parts = [
                torch.tensor([float(self.n)], dtype=f64, device=sum_x.device),
                sum_x,
                self._sum_d,
                self._cross + torch.outer(self._shift, self._sum_d),
            ]
        else:
            parts = [
                torch.zeros(1, dtype=f64),
                torch.zeros(d_in, dtype=f64),
                torch.zeros(d_out, dtype=f64),
                torch.zeros(d_in, d_out, dtype=f64),
            ]
        n, self._sum_x, self._sum_d, self._cross = tpdist.sum_tensors(parts)
        self.n = int(n.item())
        self._shift = torch.zeros(d_in, dtype=f64, device=self._sum_x.device)
        return self
