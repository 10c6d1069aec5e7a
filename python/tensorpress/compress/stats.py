"""Streaming second-moment statistics of a layer's calibration inputs.

For a layer y = x W^T + b, X holds the inputs the ORIGINAL model feeds it and X~ those of the
model compressed so far (X~ = X when nothing before it changed), one row per sample. Every
data-aware fit needs only means and the Gram matrices X~^T X~, X~^T X and X^T X, so they are
accumulated batch by batch and memory never grows with the number of samples.

How the statistics are kept (the representation; :mod:`tensorpress.compress.memory` picks one
per layer so they fit a memory budget):

- ``exact``: X~^T X~ as a whole (in, in) float64 matrix; with ``project=W`` the cross and the
  reference side are kept only through the layer's weight (X~^T X W^T and W X^T X W^T), which is
  all a fit of that layer reads.
- ``exact-fp32``: the same, the Gram accumulated and kept in float32 (half the memory; each
  batch's product is formed in float32 anyway, the sums lose about 1e-7 relative per batch).
- ``kronecker`` (convolutions, with ``project``): X~^T X~ approximated by the Kronecker product
  of a channel covariance and a spatial-offset covariance, A (C, C) and S (K, K) with
  A[c, c'] = sum_k G[(c, k), (c', k)] and S[k, k'] = sum_c G[(c, k), (c, k')], G ~ A (x) S / tr(A)
  (exact when the patches' second moment is separable in channels x offsets, as for stationary
  inputs with channel correlations independent of position). With D = X - X~ and dW = W - W^,
  the output error is ||D W^T||^2 + 2 tr(dW X~^T D W^T) + ||X~ dW^T||^2: the first two terms
  are kept exactly through the weight (X~^T X W^T, X~^T X~ W^T, W X^T X W^T) and only the last
  is approximated, so at X~ = X a full-rank fit is W itself and the error of the original
  layer is 0; memory C^2 + K^2 + 2 in * out instead of in^2.
"""

from __future__ import annotations

from typing import TypeVar

import torch
from torch import Tensor

REPRESENTATIONS = ("exact", "exact-fp32", "kronecker")


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
        acc += (x.T @ x).to(acc.dtype)
        return
    for lo in range(0, d, GRAM_PANEL):
        hi = min(lo + GRAM_PANEL, d)
        acc[lo:hi, lo:] += (x[:, lo:hi].T @ x[:, lo:]).to(acc.dtype)


def _mirror(acc: Tensor) -> Tensor:
    """The whole symmetric matrix from _add_gram's upper block triangle, in place (no second
    (in, in) matrix: the strictly lower blocks are overwritten by the upper ones' transposes)."""
    d = acc.shape[0]
    if d < 2 * GRAM_PANEL:
        return acc
    for lo in range(GRAM_PANEL, d, GRAM_PANEL):
        hi = min(lo + GRAM_PANEL, d)
        acc[lo:hi, :lo] = acc[:lo, lo:hi].T
    return acc


def _moved(gram: Tensor, s_a: Tensor, s_b: Tensor, d_a: Tensor, d_b: Tensor, n: int) -> Tensor:
    """sum (a + d_a)(b + d_b)^T over n rows from G = sum a b^T and the sums s_a, s_b:
    G + s_a d_b^T + d_a s_b^T + n d_a d_b^T (re-expressing sums about another shift)."""
    return gram + torch.outer(s_a, d_b) + torch.outer(d_a, s_b) + n * torch.outer(d_a, d_b)


def _kron_moved(a: Tensor, s: Tensor, sums: Tensor, delta: Tensor, n: int, shape: tuple[int, int]):
    """The Kronecker factors (A, S) about a shift moved by ``delta`` (see _moved), from the
    per-feature sums: sums and delta are (C * K,) vectors, reshaped (C, K)."""
    sm, dm = sums.reshape(shape), delta.reshape(shape)
    a = a + sm @ dm.T + dm @ sm.T + n * (dm @ dm.T)
    s = s + sm.T @ dm + dm.T @ sm + n * (dm.T @ dm)
    return a, s


def tall_kernel(conv) -> tuple[int, bool] | None:
    """(K, transposed) when the patch Gram of ``conv`` can be formed from correlations of its
    input (see conv_patch_gram): a (K, 1) kernel with stride 1 and dilation 1 along H, or a
    (1, K) one along W (transposed), K > 1, one group; None otherwise."""
    kh, kw = conv.kernel_size
    if conv.groups != 1:
        return None
    if kw == 1 and kh > 1 and conv.stride[0] == 1 and conv.dilation[0] == 1:
        return kh, False
    if kh == 1 and kw > 1 and conv.stride[1] == 1 and conv.dilation[1] == 1:
        return kw, True
    return None


def conv_signals(conv, x: Tensor, transposed: bool) -> Tensor:
    """The input of a tall-kernel conv as 1-D signals (B, C, L), padded as the conv pads: every
    column the conv's output reads (stride along the other axis) is one signal."""
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        x = torch.nn.functional.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
    else:
        ph, pw = conv.padding
        x = torch.nn.functional.pad(x, (pw, pw, ph, ph))
    if transposed:
        x = x.transpose(-1, -2)
        step = conv.stride[0]
    else:
        step = conv.stride[1]
    x = x[..., ::step]  # (N, C, L, columns read)
    return x.permute(0, 3, 1, 2).reshape(-1, x.shape[1], x.shape[2])


def conv_patch_gram(u: Tensor, k: int) -> Tensor | None:
    """sum over signals b and positions p of patch(b, p) patch(b, p)^T, patch(b, p)[c, j] =
    u[b, c, p + j] (the rows of a (K, 1) conv with stride 1, channel-major), as a (C * K, C * K)
    float64 matrix, from correlations of the signals u (B, C, L) instead of the patches: with
    O_q(D) = sum_b u[b, :, q] u[b, :, q + D]^T, block (j, j + D) is the sum of O_q(D) over
    q = j .. j + P - 1 (P = L - K + 1 positions): a core over q = K - 1 .. P - 1 shared by every
    j (one GEMM per lag D) plus a head and a tail of fewer than K terms each (cumulative sums).
    About K P / (2 (P + K)) times fewer FLOPs than the patches' Gram. None when P < K."""
    b, c, length = u.shape
    p = length - k + 1
    if p < k:
        return None
    f64 = torch.float64
    g = torch.empty(k * k, c, c, dtype=f64, device=u.device)  # block (j, j') at j * K + j'
    m = p - k + 1  # core positions per signal
    core_left = u[:, :, k - 1 : p].permute(1, 0, 2).reshape(c, b * m)
    ut = u.permute(2, 0, 1).contiguous()  # (L, B, C): U_q = ut[q]; batched GEMMs want it contiguous
    heads = ut[: k - 1].transpose(1, 2)  # (K - 1, C, B): U_q^T
    for d in range(k):
        n = k - d  # blocks (j, j + D) for j = 0 .. K - 1 - D
        right = u[:, :, k - 1 + d : p + d].permute(1, 0, 2).reshape(c, b * m)
        val = (core_left @ right.T).to(f64).expand(n, c, c).clone()
        if k > 1:
            # head: sum over q = j .. K - 2 of O_q(D), a reverse cumulative sum over q
            o = torch.bmm(heads, ut[d : d + k - 1]).to(f64)  # (K - 1, C, C)
            head = o.flip(0).cumsum(0).flip(0)  # head[j] = sum_{q >= j}
            val[: min(n, k - 1)] += head[: min(n, k - 1)]
        if n > 1:
            # tail: sum over q = P .. P + j - 1 of O_q(D), j = 1 .. n - 1
            t = torch.bmm(ut[p : p + n - 1].transpose(1, 2), ut[p + d : p + d + n - 1])
            val[1:] += t.to(f64).cumsum(0)
        g[d :: k + 1][:n] = val  # blocks (j, j + D): a strided diagonal of the block grid
        if d:
            g[d * k :: k + 1][:n] = val.transpose(1, 2)  # blocks (j + D, j)
    return g.reshape(k, k, c, c).permute(2, 0, 3, 1).reshape(c * k, c * k)


_T = TypeVar("_T")


def _allocated(t: _T | None) -> _T:
    """An accumulator (or shift, or setting) that is set at this point: the first update
    allocates each one these statistics keep (which ones: see GramStats.update), every read
    needs data first, and the callers check the settings a path needs (project=, kronecker=)."""
    assert t is not None
    return t


class GramStats:
    """Running means and centered Gram matrices of paired inputs (X, X~), in float64.

    Each batch is shifted by a fixed reference point (the first batch's mean) before its
    products are formed in the input's precision, so large common offsets (transformer hidden
    states have them) do not cancel catastrophically, and the batch products are added into
    float64 accumulators (float32 with ``dtype=torch.float32``).

    Args:
        in_features: the row length.
        paired: False when X~ = X (one-shot statistics): then only X^T X is kept.
        keep_rows: keep up to this many (X, X~) rows, a uniform sample of all the rows seen
            (reservoir sampling, seeded), for methods that need samples, not moments (the
            convex program and the ReLU-aware fit).
        reference: one-shot statistics of the very same X rows (the original model's inputs
            to this layer, from the same batches), whose X^T X is then used instead of being
            accumulated again (a third of the work of a paired update).
        project: the weight W (out, in) of the one layer these statistics serve: X~^T X is
            then kept only as X~^T X W^T (in, out) and X^T X only as W X^T X W^T (out, out),
            which is all a fit of that layer reads (see cov_cross_times and ref_energy), at
            out/in of the cost. With paired=False it keeps X^T X W^T beside X^T X.
        dtype: the precision the Gram matrices are accumulated and kept in (torch.float64 or
            torch.float32; the means and reads are float64 either way).
        kronecker: (channels, offsets) with channels * offsets = in_features, the row laid out
            channel-major (a conv's patch): keep X~^T X~ as a Kronecker product of channel and
            offset covariances (see the module docstring); needs ``project``.
    """

    def __init__(
        self,
        in_features: int,
        paired: bool = True,
        keep_rows: int = 0,
        reference: GramStats | None = None,
        project: Tensor | None = None,
        dtype: torch.dtype = torch.float64,
        kronecker: tuple[int, int] | None = None,
        conv=None,
        buffer_bytes: int = 64 << 20,
    ) -> None:
        self.in_features, self.paired, self.keep_rows = in_features, paired, keep_rows
        if reference is not None and (not paired or reference.in_features != in_features):
            raise ValueError("reference: expected one-shot statistics of the same features for paired statistics")
        if project is not None and (project.dim() != 2 or project.shape[1] != in_features):
            raise ValueError(
                f"project: expected a weight (out, {in_features}) for paired statistics, got "
                f"{tuple(project.shape) if project is not None else None}"
            )
        if dtype not in (torch.float64, torch.float32):
            raise ValueError(f"dtype: expected torch.float64 or torch.float32, got {dtype}")
        if kronecker is not None:
            ok = (
                isinstance(kronecker, (tuple, list))
                and len(kronecker) == 2
                and all(isinstance(k, int) and k >= 1 for k in kronecker)
                and kronecker[0] * kronecker[1] == in_features
            )
            if not ok:
                raise ValueError(
                    f"kronecker: expected (channels, offsets) with channels * offsets = {in_features}, "
                    f"got {kronecker!r}"
                )
            if project is None:
                raise ValueError("kronecker: Kronecker-factored statistics need project= (the layer's weight)")
            if keep_rows:
                raise ValueError("keep_rows: Kronecker-factored statistics keep no rows")
            kronecker = (int(kronecker[0]), int(kronecker[1]))
        self.project = None if project is None else project.detach().to(torch.float64)
        self.dtype, self.kronecker = dtype, kronecker
        self.reference = reference
        self._upper = False  # True while the Grams hold upper block triangles (see _add_gram)
        self.n = 0
        self._shift_ref: Tensor | None = None
        self._shift_in: Tensor | None = None
        # the accumulators, allocated by the first update: which ones depends on paired,
        # project and kronecker (see update); the others stay None
        self._sum_ref: Tensor | None = None
        self._sum_in: Tensor | None = None
        self._gram_ref: Tensor | None = None
        self._gram_in: Tensor | None = None
        self._cross: Tensor | None = None
        self._ref_out: Tensor | None = None
        self._kron_a: Tensor | None = None
        self._kron_s: Tensor | None = None
        self._in_proj: Tensor | None = None
        # a tall-kernel conv whose only (in, in) Gram is the input side's: that Gram is formed
        # from correlations of the conv's input signals (conv_patch_gram), buffered up to
        # buffer_bytes (see update_conv)
        only_in_gram = kronecker is None and (not paired or (project is not None and reference is None))
        self.conv = conv
        self._tall = tall_kernel(conv) if (conv is not None and (only_in_gram or kronecker is not None)) else None
        if conv is not None and conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] != in_features:
            raise ValueError(f"conv: expected a conv with {in_features} features per patch, got {conv}")
        self.buffer_bytes = buffer_bytes
        self._signals: list[Tensor] = []
        self._signal_bytes = 0
        self.rows_ref: list[Tensor] = []
        self.rows_in: list[Tensor] = []
        self._kept = 0
        self._sample_gen = torch.Generator().manual_seed(0) if keep_rows else None

    @property
    def representation(self) -> str:
        """How X~^T X~ is kept: "exact", "exact-fp32" or "kronecker" (see the module docstring)."""
        if self.kronecker is not None:
            return "kronecker"
        return "exact" if self.dtype == torch.float64 else "exact-fp32"

    @property
    def _keeps_gram_ref(self) -> bool:
        # one-shot: X^T X is the input Gram itself (unless Kronecker-factored); paired: only
        # when neither a reference nor the projection stands in for it
        if not self.paired:
            return self.kronecker is None
        return self.reference is None and self.project is None

    def update(self, x_ref: Tensor, x_in: Tensor | None = None, _in_gram: bool = True) -> None:
        """Add rows: x_ref (rows, in) from the original model and x_in (rows, in) from the
        compressed one (ignored, and may be None, when not paired). (``_in_gram`` False: the
        input side's Gram is added by update_conv from the signals.)"""
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
            self._shift_in = x_in.mean(0) if self.paired else self._shift_ref
        if self._sum_ref is None:
            d = self.in_features
            dev = x_ref.device

            def zeros(*s, dtype=torch.float64):
                return torch.zeros(*s, dtype=dtype, device=dev)

            self._sum_ref, self._sum_in = zeros(d), (zeros(d) if self.paired else None)
            self._gram_ref = zeros(d, d, dtype=self.dtype) if self._keeps_gram_ref else None
            if self.kronecker is not None:
                c, k = self.kronecker
                self._kron_a, self._kron_s = zeros(c, c), zeros(k, k)
                if self.paired:  # kronecker= needs project= (checked in __init__)
                    self._in_proj = zeros(d, _allocated(self.project).shape[0])
            elif self.paired:
                self._gram_in = zeros(d, d, dtype=self.dtype)
            if self.project is not None:
                out = self.project.shape[0]
                self._cross, self._ref_out = zeros(d, out), zeros(out, out)
            elif self.paired:
                self._cross = zeros(d, d)
            # the Grams hold upper block triangles until first read (update_conv adds whole ones)
            self._upper = self._tall is None
        # rows added after a read go into the whole matrices
        add_gram = _add_gram if self._upper else (lambda acc, x: acc.add_((x.T @ x).to(acc.dtype)))
        # the in-place sums below add into the accumulators allocated above
        a = x_ref - _allocated(self._shift_ref)
        sum_ref = _allocated(self._sum_ref)
        sum_ref += a.sum(0, dtype=torch.float64)
        if self._gram_ref is not None and (self.paired or _in_gram):
            add_gram(self._gram_ref, a)
        b = a
        if self.paired:
            b = x_in - _allocated(self._shift_in)
            sum_in = _allocated(self._sum_in)
            sum_in += b.sum(0, dtype=torch.float64)
        if self.kronecker is not None and _in_gram:
            c, k = self.kronecker
            kron_a, kron_s = _allocated(self._kron_a), _allocated(self._kron_s)
            bk = b.reshape(-1, c, k)
            for j in range(k):  # one offset at a time: no (rows * K, C) copy
                col = bk[:, :, j]
                kron_a += (col.T @ col).to(torch.float64)
            flat = b.reshape(-1, k)
            kron_s += (flat.T @ flat).to(torch.float64)
        elif self.paired and _in_gram:
            add_gram(_allocated(self._gram_in), b)
        if self.project is not None:
            p = self.project.to(device=a.device, dtype=a.dtype)
            aw = a @ p.T
            cross, ref_out = _allocated(self._cross), _allocated(self._ref_out)
            cross += (b.T @ aw).to(torch.float64)
            ref_out += (aw.T @ aw).to(torch.float64)
            if self._in_proj is not None:
                self._in_proj += (b.T @ (b @ p.T)).to(torch.float64)
        elif self.paired:
            cross = _allocated(self._cross)
            cross += (b.T @ a).to(torch.float64)
        seen = self.n
        self.n += x_ref.shape[0]
        if self.keep_rows:
            self._keep_sample(x_ref, x_in, seen)

    def _keep_sample(self, x_ref: Tensor, x_in: Tensor, seen: int) -> None:
        """Reservoir sampling (Vitter's algorithm R, a batch at a time): the kept rows stay a
        uniform sample of every row seen so far, not of the first batches (calibration batches
        are often sorted, e.g. by sentence length: the first rows alone misrepresent the data).
        Rows are copied (never views of the caller's activations)."""
        k, b = self.keep_rows, x_ref.shape[0]
        fill = min(max(k - self._kept, 0), b)
        if fill:
            self.rows_ref.append(x_ref[:fill].to(torch.float64, copy=True))
            self.rows_in.append(x_in[:fill].to(torch.float64, copy=True))
            self._kept += fill
        rest = b - fill
        if rest == 0:
            return
        if len(self.rows_ref) > 1:  # one tensor per side from here on: slots are replaced in place
            self.rows_ref, self.rows_in = [torch.cat(self.rows_ref)], [torch.cat(self.rows_in)]
        # row j of the rest is row number seen + fill + j (from 0) of all rows: kept with
        # probability k / (number + 1), in a uniformly drawn slot
        number = seen + fill + torch.arange(rest, dtype=torch.float64)
        u = torch.rand(rest, generator=self._sample_gen, dtype=torch.float64)
        accepted = (u * (number + 1) < k).nonzero().flatten()
        if accepted.numel() == 0:
            return
        slots = torch.randint(k, (accepted.numel(),), generator=self._sample_gen)
        last = {int(s): fill + int(j) for s, j in zip(slots, accepted)}  # a later row wins a slot
        where = torch.tensor(list(last), dtype=torch.long)
        rows = torch.tensor(list(last.values()), dtype=torch.long, device=x_ref.device)
        self.rows_ref[0][where.to(self.rows_ref[0].device)] = x_ref[rows].to(torch.float64)
        self.rows_in[0][where.to(self.rows_in[0].device)] = x_in[rows].to(torch.float64)

    def update_conv(self, x_ref: Tensor, x_in: Tensor | None = None, max_rows: int | None = None) -> None:
        """Add the patch rows of the conv given at construction for its inputs x_ref and x_in
        (N, C, H, W) (x_in ignored when not paired), at most ``max_rows`` patch rows formed at
        a time. For a tall kernel (see tall_kernel) the input side's Gram is formed from the
        signals' correlations (conv_patch_gram, float32 products summed in float64), the other
        statistics from the patch rows; otherwise every statistic from the patch rows."""
        from tensorpress.compress.calibrate import layer_row_chunks

        conv = self.conv
        if conv is None:
            raise ValueError("conv: update_conv needs GramStats(..., conv=the layer)")
        x_in = x_ref if not self.paired or x_in is None else x_in
        if x_in.shape != x_ref.shape:
            raise ValueError(f"x_in: expected the shape of x_ref {tuple(x_ref.shape)}, got {tuple(x_in.shape)}")
        if x_ref.numel() == 0:  # no samples: nothing to add (and no mean to take the shift from)
            return
        chunks = zip(layer_row_chunks(conv, x_ref, None, max_rows), layer_row_chunks(conv, x_in, None, max_rows))
        if self._tall is None:
            for a, b in chunks:
                self.update(a, b)
            return
        k, transposed = self._tall
        work = _work_dtype(x_ref)
        if self._shift_ref is None:  # one shift per channel: the signals can be shifted before their products
            dims = [0, 2, 3] if x_ref.dim() == 4 else [1, 2]
            per_ref = x_ref.detach().to(work).mean(dims)
            per_in = x_in.detach().to(work).mean(dims) if self.paired else per_ref
            self._shift_ref = per_ref.repeat_interleave(k)
            self._shift_in = per_in.repeat_interleave(k) if self.paired else self._shift_ref
        for a, b in chunks:
            self.update(a, b, _in_gram=False)
        sig = conv_signals(conv, x_in.detach().to(work), transposed)
        sig = sig - _allocated(self._shift_in).reshape(-1, k)[:, 0].to(sig.device)[None, :, None]
        if self.kronecker is not None:
            self._add_kron_signals(sig, k)
            return
        self._signals.append(sig)
        self._signal_bytes += sig.numel() * sig.element_size()
        if self._signal_bytes >= self.buffer_bytes:
            self._flush()

    def _add_kron_signals(self, u: Tensor, k: int) -> None:
        """The Kronecker factors' sums from the (shifted) signals u (B, C, L) of a tall kernel:
        A = sum over patches and offsets of x_c x_e = sum over positions q of m_q u_q u_q^T (m_q:
        the patches x offsets that read q), S = the offsets' Gram summed over channels (the patch
        Gram of each channel's signal): L instead of K * P products per signal for A."""
        b, c, length = u.shape
        p = length - k + 1
        if p <= 0:
            return
        q = torch.arange(length, device=u.device)
        m = (torch.clamp(q, max=k - 1) - torch.clamp(q - p + 1, min=0) + 1).clamp(min=0).to(u.dtype)
        flat = (u * m.sqrt()).permute(1, 0, 2).reshape(c, b * length)
        kron_a, kron_s = _allocated(self._kron_a), _allocated(self._kron_s)  # by update (update_conv)
        kron_a += (flat @ flat.T).to(torch.float64)
        chan = u.reshape(b * c, 1, length)
        gram = conv_patch_gram(chan, k)
        if gram is None:
            rows = chan.unfold(2, k, 1).reshape(-1, k)
            gram = (rows.T @ rows).to(torch.float64)
        kron_s += gram

    def _flush(self) -> None:
        """Add the buffered signals' patch Gram into the input side's Gram."""
        if not self._signals:
            return
        u = torch.cat(self._signals) if len(self._signals) > 1 else self._signals[0]
        self._signals, self._signal_bytes = [], 0
        k = _allocated(self._tall)[0]  # signals are buffered for a tall kernel only
        gram = conv_patch_gram(u, k)
        acc = _allocated(self._gram_in if self.paired else self._gram_ref)
        if gram is None:  # fewer positions than offsets: the patches' own Gram
            rows = u.unfold(2, k, 1).permute(0, 2, 1, 3).reshape(-1, u.shape[1] * k)
            acc += (rows.T @ rows).to(acc.dtype)
        else:
            acc += gram.to(acc.dtype)

    def _require_data(self):
        if self.n == 0:
            raise ValueError("calibration data: no rows reached this layer")
        self._whole()

    def _whole(self) -> None:
        """Turn the Grams' upper block triangles into whole matrices (once, at first read)."""
        self._flush()
        if self.n and self._upper:
            if self._gram_ref is not None:
                self._gram_ref = _mirror(self._gram_ref)
            if self._gram_in is not None:
                self._gram_in = _mirror(self._gram_in)
            self._upper = False

    @property
    def _sum_in_side(self) -> Tensor:
        return _allocated(self._sum_in if self.paired else self._sum_ref)

    @property
    def mean_ref(self) -> Tensor:
        """Mean of the X rows (in,)."""
        self._require_data()
        return _allocated(self._shift_ref).to(torch.float64) + _allocated(self._sum_ref) / self.n

    @property
    def mean_in(self) -> Tensor:
        """Mean of the X~ rows (in,)."""
        if not self.paired:
            return self.mean_ref
        self._require_data()
        return _allocated(self._shift_in).to(torch.float64) + _allocated(self._sum_in) / self.n

    def _centered(self, gram: Tensor, sum_a: Tensor, sum_b: Tensor) -> Tensor:
        # sum (a - mean_a)(b - mean_b)^T from the shifted sums: G - s_a s_b^T / n
        out = gram.to(torch.float64)
        if out is gram:
            out = gram.clone()
        return out.sub_(torch.outer(sum_a, sum_b).div_(self.n))

    def _no_matrix(self, what: str) -> ValueError:
        return ValueError(
            f"stats: {what} is not kept as a matrix by these statistics (representation "
            f"{self.representation!r}, project={'set' if self.project is not None else 'None'}); "
            f"use in_apply / in_quad / ref_energy / cov_cross_times"
        )

    @property
    def cov_ref(self) -> Tensor:
        """Centered X^T X (in, in): sum over rows of (x - mean)(x - mean)^T."""
        self._require_data()
        if self.reference is not None:
            if self.reference.n != self.n:
                raise RuntimeError(f"reference: its statistics cover {self.reference.n} rows, these {self.n}")
            return self.reference.cov_ref
        if self._gram_ref is None:
            raise self._no_matrix("X^T X")
        sum_ref = _allocated(self._sum_ref)
        return self._centered(self._gram_ref, sum_ref, sum_ref)

    @property
    def cov_in(self) -> Tensor:
        """Centered X~^T X~ (in, in)."""
        if not self.paired:
            return self.cov_ref
        self._require_data()
        if self._gram_in is None:
            raise self._no_matrix("X~^T X~")
        sum_in = _allocated(self._sum_in)
        return self._centered(self._gram_in, sum_in, sum_in)

    @property
    def cov_cross(self) -> Tensor:
        """Centered X~^T X (in, in)."""
        if self.project is not None:
            raise ValueError("stats: X~^T X was kept only times the layer's weight (project=); use cov_cross_times")
        if not self.paired:
            return self.cov_ref
        self._require_data()
        return self._centered(_allocated(self._cross), _allocated(self._sum_in), _allocated(self._sum_ref))

    def _check_projected(self, w: Tensor) -> None:
        project = _allocated(self.project)  # called for statistics made with project= only
        if w.shape != project.shape or not torch.equal(w.to(project.device), project):
            raise ValueError(
                f"weight: these statistics keep X~^T X only times the weight they were projected on "
                f"{tuple(project.shape)}; expected that weight"
            )

    def cov_cross_times(self, weight: Tensor) -> Tensor:
        """Centered X~^T X W^T (in, out) for the layer's weight W (out, in), float64."""
        w = weight.detach().to(torch.float64)
        if self.project is None:
            return self.cov_cross.to(w.device) @ w.T
        self._require_data()
        self._check_projected(w)
        sum_ref = _allocated(self._sum_ref)
        centered = _allocated(self._cross) - torch.outer(self._sum_in_side, self.project @ sum_ref) / self.n
        if self.kronecker is not None:
            # the fit's effective target (module docstring): C^ W^T + (X~^T X - X~^T X~) W^T
            centered = centered - self._in_projected() + self.in_apply(self.project).T
        return centered.to(w.device)

    def _in_projected(self) -> Tensor:
        """Centered X~^T X~ W^T (in, out), exact (Kronecker-factored statistics)."""
        project = _allocated(self.project)  # Kronecker-factored statistics have project=
        if self._in_proj is None:  # one-shot: X~ = X
            sum_ref = _allocated(self._sum_ref)
            return _allocated(self._cross) - torch.outer(sum_ref, project @ sum_ref) / self.n
        sum_in = _allocated(self._sum_in)
        return self._in_proj - torch.outer(sum_in, project @ sum_in) / self.n

    def energy_offset(self, weight: Tensor) -> float:
        """What the quadratic objective built from these statistics (in_apply, cov_cross_times,
        ref_energy) misses of the output error: 0 for exact statistics; for Kronecker-factored
        ones tr(W C^ W^T) - tr(W Cin W^T), so that the error of W^ = W is exactly that of the
        inputs' difference, ||(X - X~) W^T||^2 (see the module docstring)."""
        if self.kronecker is None:
            return 0.0
        w = weight.detach().to(torch.float64)
        self._require_data()
        self._check_projected(w)
        project = _allocated(self.project)  # Kronecker-factored statistics have project=
        return self.in_quad(project) - float((project.T * self._in_projected()).sum())

    def ref_energy(self, weight: Tensor) -> float:
        """tr(W Cr W^T): the centered energy of the original outputs X W^T."""
        w = weight.detach().to(torch.float64)
        self._require_data()
        if self.reference is not None:
            return self.reference.ref_energy(w)
        if self.project is not None and self._gram_ref is None:
            self._check_projected(w)
            ws = self.project @ _allocated(self._sum_ref)
            return float(_allocated(self._ref_out).trace() - ws.square().sum() / self.n)
        return float(((w @ self.cov_ref.to(w.device)) * w).sum())

    def in_apply(self, v: Tensor) -> Tensor:
        """V Cin (m, in) for V (m, in), Cin the centered X~^T X~ (or its Kronecker approximation)."""
        v = v.to(torch.float64)
        if self.kronecker is None:
            return v @ self.cov_in.to(v.device)
        a, s = self._kron_factors()
        c, k = self.kronecker
        return torch.einsum("ce,mek,kl->mcl", a.to(v.device), v.reshape(-1, c, k), s.to(v.device)).reshape(v.shape)

    def in_quad(self, v: Tensor) -> float:
        """tr(V Cin V^T) (see in_apply)."""
        return float((self.in_apply(v) * v.to(torch.float64)).sum())

    def in_mean_diag(self) -> float:
        """The mean of Cin's diagonal (the scale a relative ridge is taken of)."""
        self._require_data()
        s_in = self._sum_in_side
        if self.kronecker is not None:
            return float(self._kron_factors()[1].trace()) / self.in_features
        gram = self._gram_in if self.paired else self._gram_ref
        if gram is None:
            return float(self.cov_in.diagonal().mean())
        return float((gram.diagonal().to(torch.float64) - s_in.square() / self.n).mean())

    def _kron_factors(self) -> tuple[Tensor, Tensor]:
        """The centered Kronecker factors (A / tr(A), S): Cin ~ (A / tr A) (x) S."""
        self._require_data()
        sm = self._sum_in_side.reshape(_allocated(self.kronecker))  # called for Kronecker factors only
        a = _allocated(self._kron_a) - sm @ sm.T / self.n
        s = _allocated(self._kron_s) - sm.T @ sm / self.n
        tr = float(a.trace())
        return (a / tr if tr > 0 else a), s

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
            self._signals, self._signal_bytes = [], 0
            return self

        # re-express the other's sums about this accumulator's shifts (both hold rows: their
        # accumulators are allocated; without project= and kronecker= every Gram is kept)
        n = other.n
        d_ref = (_allocated(other._shift_ref) - _allocated(self._shift_ref)).to(torch.float64)
        o_sum_ref = _allocated(other._sum_ref)
        gram_ref = _allocated(self._gram_ref)
        gram_ref += _moved(_allocated(other._gram_ref), o_sum_ref, o_sum_ref, d_ref, d_ref, n).to(self.dtype)
        if self.paired:
            d_in = (_allocated(other._shift_in) - _allocated(self._shift_in)).to(torch.float64)
            o_sum_in = _allocated(other._sum_in)
            gram_in, cross, sum_in = _allocated(self._gram_in), _allocated(self._cross), _allocated(self._sum_in)
            gram_in += _moved(_allocated(other._gram_in), o_sum_in, o_sum_in, d_in, d_in, n).to(self.dtype)
            cross += _moved(_allocated(other._cross), o_sum_in, o_sum_ref, d_in, d_ref, n)
            sum_in += o_sum_in + n * d_in
        sum_ref = _allocated(self._sum_ref)
        sum_ref += o_sum_ref + n * d_ref
        self.n += n
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
        dev = _allocated(self._sum_ref).device if self.n else torch.device("cpu")
        proj = self.project  # the ref side is kept times W^T: move it through W too
        zero_vec = torch.zeros(d, dtype=f64, device=dev)
        # 1. the global means become the common shift (the best-conditioned one)
        s_ref = (_allocated(self._shift_ref).to(f64) * self.n + _allocated(self._sum_ref)) if self.n else zero_vec
        s_in = (
            (_allocated(self._shift_in).to(f64) * self.n + _allocated(self._sum_in))
            if (self.n and self.paired)
            else zero_vec
        )
        n_t, s_ref, s_in = tpdist.sum_tensors([torch.tensor([float(self.n)], dtype=f64), s_ref, s_in])
        total = int(n_t.item())
        if total == 0:
            return self
        mu_ref = s_ref / total
        mu_in = s_in / total if self.paired else mu_ref

        # 2. this process's sums re-expressed about the common shift (see _moved); the parts
        #    are named, with the shapes every process agrees on (zeros where n == 0)
        out = 0 if proj is None else proj.shape[0]
        all_shapes: dict[str, tuple[int, ...] | None] = {"sum_ref": (d,), "sum_in": (d,) if self.paired else None}
        all_shapes["gram_ref"] = (d, d) if self._keeps_gram_ref else None
        all_shapes["gram_in"] = (d, d) if (self.paired and self.kronecker is None) else None
        all_shapes["kron_a"] = None if self.kronecker is None else (self.kronecker[0],) * 2
        all_shapes["kron_s"] = None if self.kronecker is None else (self.kronecker[1],) * 2
        all_shapes["cross"] = (d, out) if proj is not None else ((d, d) if self.paired else None)
        all_shapes["ref_out"] = (out, out) if proj is not None else None
        all_shapes["in_proj"] = (d, out) if self._in_proj is not None or (self.kronecker and self.paired) else None
        shapes = {k: v for k, v in all_shapes.items() if v is not None}
        if self.n:
            # this process holds rows: the accumulators its settings keep are allocated
            n = self.n
            sum_ref = _allocated(self._sum_ref)
            d_ref = _allocated(self._shift_ref).to(f64) - mu_ref
            d_in = (_allocated(self._shift_in).to(f64) - mu_in) if self.paired else d_ref
            s_in_side = self._sum_in_side
            got = {"sum_ref": sum_ref + n * d_ref}
            if self.paired:
                got["sum_in"] = _allocated(self._sum_in) + n * d_in
            if "gram_ref" in shapes:
                got["gram_ref"] = _moved(_allocated(self._gram_ref).to(f64), sum_ref, sum_ref, d_ref, d_ref, n)
            if "gram_in" in shapes:
                sum_in = _allocated(self._sum_in)
                got["gram_in"] = _moved(_allocated(self._gram_in).to(f64), sum_in, sum_in, d_in, d_in, n)
            if "kron_a" in shapes:
                got["kron_a"], got["kron_s"] = _kron_moved(
                    _allocated(self._kron_a), _allocated(self._kron_s), s_in_side, d_in, n, _allocated(self.kronecker)
                )
            if proj is not None:
                p = proj.to(dev)
                got["cross"] = _moved(_allocated(self._cross), s_in_side, p @ sum_ref, d_in, p @ d_ref, n)
                got["ref_out"] = _moved(_allocated(self._ref_out), p @ sum_ref, p @ sum_ref, p @ d_ref, p @ d_ref, n)
                if "in_proj" in shapes:
                    sum_in = _allocated(self._sum_in)
                    got["in_proj"] = _moved(_allocated(self._in_proj), sum_in, p @ sum_in, d_in, p @ d_in, n)
            elif self.paired:
                got["cross"] = _moved(_allocated(self._cross), _allocated(self._sum_in), sum_ref, d_in, d_ref, n)
        else:
            got = {k: torch.zeros(*s, dtype=f64, device=dev) for k, s in shapes.items()}
        keys = list(shapes)
        summed = dict(zip(keys, tpdist.sum_tensors([got[k] for k in keys])))
        self._sum_ref = summed["sum_ref"]
        self._sum_in = summed.get("sum_in")
        self._gram_ref = summed["gram_ref"].to(self.dtype) if "gram_ref" in summed else None
        self._gram_in = summed["gram_in"].to(self.dtype) if "gram_in" in summed else None
        self._kron_a, self._kron_s = summed.get("kron_a"), summed.get("kron_s")
        self._cross, self._ref_out = summed.get("cross"), summed.get("ref_out")
        self._in_proj = summed.get("in_proj")
        self._shift_ref, self._shift_in = mu_ref, mu_in
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
        self._sum_x: Tensor | None = None
        self._sum_d: Tensor | None = None
        self._cross: Tensor | None = None

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
        # in place into the accumulators allocated with the shift (above, on the first rows)
        sum_x, sum_d, cross = _allocated(self._sum_x), _allocated(self._sum_d), _allocated(self._cross)
        b = x_in - _allocated(self._shift).to(work)
        sum_x += b.sum(0, dtype=torch.float64)
        sum_d += d.sum(0, dtype=torch.float64)
        cross += (b.T @ d).to(torch.float64)
        self.n += x_in.shape[0]

    @property
    def mean_d(self) -> Tensor:
        if self.n == 0:
            raise ValueError("calibration data: no rows reached this layer")
        return _allocated(self._sum_d) / self.n

    @property
    def cov_cross(self) -> Tensor:
        """Centered X~^T D (in, out)."""
        if self.n == 0:
            raise ValueError("calibration data: no rows reached this layer")
        return _allocated(self._cross) - torch.outer(_allocated(self._sum_x), _allocated(self._sum_d)) / self.n

    def all_reduce_(self) -> OffsetStats:
        """Sum over the processes of the torch.distributed group (a no-op without one)."""
        from tensorpress.compress import distributed as tpdist

        if not tpdist.active():
            return self
        f64, d_in, d_out = torch.float64, self.in_features, self.out_features
        if self.n:  # uncentered sums (shift 0): sum x, sum d, sum x d^T (allocated: rows were added)
            shift, sum_d = _allocated(self._shift), _allocated(self._sum_d)
            sum_x = _allocated(self._sum_x) + self.n * shift
            parts = [
                torch.tensor([float(self.n)], dtype=f64, device=sum_x.device),
                sum_x,
                sum_d,
                _allocated(self._cross) + torch.outer(shift, sum_d),
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
