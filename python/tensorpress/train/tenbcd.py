"""tenBCD: gradient-free tensor block coordinate descent for TT-compressed (or pruned) networks.

Li, Chung, Du, Wang, Zhou and Shen, "On Model Compression for Neural Networks: Framework,
Algorithm, and Convergence Guarantee" (arXiv 2303.06815). Samples are columns internally: V_0 = X^T,
U_i = W_i V_{i-1}, V_i = ReLU(U_i), V_N = U_N, Y one-hot. With 0-based weights W[0..N-1] (this module's indexing;
the paper counts from 1) the objective is

    F = 1/2||V_N - Y||^2 + sum_i rho/2||U_i - W_i V_{i-1}||^2 + sum_{i<N} gamma/2||V_i - ReLU(U_i)||^2
        + gamma/2||V_N - U_N||^2 + sum_{i constrained} tau_eff/2||W_i - T_i||^2 + sum_i decay_eff/2||W_i||^2,

T_i = TTD(G_i; r_i) (TT layers) or P_s(W_i) (pruned layers). Each iteration updates the blocks
from the output layer back, each by its exact minimizer (with a proximal term alpha/2||.-old||^2
on V_N and U_i, alpha_w_eff/2||.-old||^2 on W_i), so F never increases (the TT-SVD is
quasi-optimal rather than optimal; a new projection is kept only when it is at least as close to
W_i as the old one). The weight decay term is ours, not the paper's (weight_decay=0 drops it).

Scale convention: the data terms are sums over the n samples while the terms on the weights
alone (the TT term, the weights' proximal term, the weight decay) are not. With ``scale="n"``
(default) those three are multiplied by n (tau_eff = tau * n, alpha_w_eff = alpha_w * n,
decay_eff = weight_decay * n), as if the data terms were averages over the samples; the same
hyperparameters then mean the same thing at any n, and a run converges in tens of iterations,
but to a lower plateau (the paper's CNN: 92.2% test accuracy at TT rank 40 by iteration 30-40).
With ``scale=None`` they are used as given, as the authors do (tau = 0.1, alpha = 1 on W: see
tensorpress.train.PaperCNN): W then stays far from its TT projection for many iterations and
the TT network's accuracy climbs slowly, over hundreds of iterations (the authors log 54% at
iteration 50 and 97.6% at 1,000); judged after tens of iterations it looks worse than it is.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tensorpress._validate import is_int
from tensorpress.linalg import blas
from tensorpress.train.projections import prune_projection, tt_project, tt_project_reshaped, tt_reconstruct_reshaped
from tensorpress.train.spec import FLATTEN_ORDERS, ConvSpec, ReshapedTTSpec, TTSpec, reshaped_tt_spec, resolve_tt_spec
from tensorpress.train.updates import (
    GramFactor,
    SolveError,
    gram_factor,
    update_u_hidden,
    update_u_out,
    update_v_hidden,
    update_v_out,
    update_w,
)
from tensorpress.tt_format import core_stds, max_bond_ranks

HISTORY_KEYS = (
    "iteration",
    "objective",
    "train_acc",
    "test_acc",
    "test_acc_free_w",
    "tt_gap",
    "time_update_s",
    "time_eval_s",
    "step_sq",
)
CHECKPOINT_FORMAT = "tensorpress.train.TenBCD checkpoint"
CHECKPOINT_VERSION = 1


class DivergenceError(FloatingPointError):
    """A tenBCD run produced a non-finite value; the message names the iteration and the block."""


def one_hot(labels: Tensor, num_classes: int, dtype=torch.float32) -> Tensor:
    """(n,) integer labels -> (n, num_classes) one-hot."""
    return F.one_hot(labels.long(), num_classes).to(dtype)


def _check_number(name, v, lo=0.0, strict=False):
    if (
        isinstance(v, bool)
        or not isinstance(v, (int, float))
        or not math.isfinite(v)
        or (v <= lo if strict else v < lo)
    ):
        raise ValueError(f"{name}: expected a finite number {'>' if strict else '>='} {lo}, got {v!r}")
    return float(v)


class TenBCD:
    r"""Train a ReLU MLP (optionally with a Conv2d front) whose chosen weights are TT or pruned, by tenBCD.

    Args:
        layer_sizes: [d_0, d_1, ..., d_N]: input features, hidden widths, number of classes.
            With ``conv``, d_1 must be the conv's flattened output size.
        tt_layers: {weight index (0-based): spec}; spec is an int rank cap, a list of d-1 bond
            ranks, a dict(ranks=, in_factors=, out_factors=) or a TTSpec (a TT-matrix; factors
            chosen as in TTLinear when omitted), or a dict(shape=, ranks=) or ReshapedTTSpec (a TT
            of the weight's row-major reshape into ``shape``, the authors' notebook's format).
        prune: {weight index: sparsity s in [0, 1)}: P_s(W) (keep the largest (1-s) fraction of
            entries) in place of the TT projection.
        gamma, rho, alpha, tau: the method's weights (gamma, rho > 0; alpha, tau >= 0); alpha is
            the proximal weight of the V_N and U_i updates.
        alpha_w: the proximal weight of the W_i updates (>= 0; 0.1, scaled by n by default: it
            slows W down enough not to overfit the training set).
        weight_decay: decay/2 ||W_i||^2 on every weight (>= 0; ours, not the paper's).
        scale: "n" (tau, alpha_w and weight_decay multiplied by n_samples, default) or None.
        conv: a ConvSpec: weight 0 is a bias-free Conv2d trained as a linear map on patches.
        svd_method: passed to truncated_svd in the TT-SVD ("auto" or "lapack" for exact SVDs).
        init: "tt": hidden weights start with entry variance init_gain / fan_in (TT layers exactly
            on random TT cores scaled so, pruned layers on their projection), the output layer
            with 1 / fan_in. "normal": every W_i = init_std * N(0, 1) entries (the authors'
            notebook: 0.01), and each constrained layer's first target is its projection (TT
            layers: the TT-SVD at every bond rank capped at init_target_rank, default the
            layer's own ranks; the notebook uses 700).
        projection_accept: "closer" (a new TT projection replaces T_i only when it is at least
            as close to W_i as the old one, so that F never increases) or "always" (the notebook).
        dtype, device: of all state (float32 or float64; CPU or CUDA). device None: X's device.
        seed: the initialization's random seed.

    After fit: ``weights_`` (W_i), ``targets_`` (T_i, None for free layers), ``cores_`` (TT cores
    per TT layer), ``history_`` (per-iteration objective, accuracies with the TT/pruned weights,
    TT gaps ||W - T||/||W||, times, and step_sq = ||x_{k+1} - x_k||^2 summed over every block W_i,
    U_i, V_i, T_i: the quantity of the paper's O(1/k) rate), ``n_iter_``.
    """

    def __init__(
        self,
        layer_sizes: Sequence[int],
        tt_layers: Mapping[int, object] | None = None,
        prune: Mapping[int, float] | None = None,
        gamma: float = 5.0,
        rho: float = 5.0,
        alpha: float = 1.0,
        tau: float = 1.0,
        alpha_w: float = 0.1,
        weight_decay: float = 0.01,
        scale: str | None = "n",
        conv: ConvSpec | None = None,
        svd_method: str = "auto",
        init_gain: float = 2.0,
        init: str = "tt",
        init_std: float = 0.01,
        init_target_rank: int | None = None,
        projection_accept: str = "closer",
        dtype: torch.dtype = torch.float32,
        device=None,
        seed: int = 0,
    ) -> None:
        if (
            not isinstance(layer_sizes, (list, tuple))
            or len(layer_sizes) < 2
            or not all(is_int(d) and d >= 1 for d in layer_sizes)
        ):
            raise ValueError(f"layer_sizes: expected a list of >= 2 positive ints, got {layer_sizes!r}")
        self.layer_sizes = list(layer_sizes)
        N = len(layer_sizes) - 1
        self.gamma = _check_number("gamma", gamma, strict=True)
        self.rho = _check_number("rho", rho, strict=True)
        self.alpha = _check_number("alpha", alpha)
        self.tau = _check_number("tau", tau)
        self.alpha_w = _check_number("alpha_w", alpha_w)
        self.weight_decay = _check_number("weight_decay", weight_decay)
        if scale not in ("n", None, "none"):
            raise ValueError(f"scale: expected 'n' or None, got {scale!r}")
        self.scale = None if scale == "none" else scale
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype: expected torch.float32 or torch.float64, got {dtype}")
        self.dtype, self.device, self.seed = dtype, device, seed
        self.init_gain = _check_number("init_gain", init_gain, strict=True)
        if svd_method not in ("auto", "lapack", "randomized", "jacobi"):
            raise ValueError(f"svd_method: expected 'auto' or 'lapack', got {svd_method!r}")
        self.svd_method = svd_method
        if init not in ("tt", "normal"):
            raise ValueError(f"init: expected 'tt' or 'normal', got {init!r}")
        self.init = init
        self.init_std = _check_number("init_std", init_std, strict=True)
        if init_target_rank is not None and (not is_int(init_target_rank) or init_target_rank < 1):
            raise ValueError(f"init_target_rank: expected None or an int >= 1, got {init_target_rank!r}")
        self.init_target_rank = init_target_rank
        if projection_accept not in ("closer", "always"):
            raise ValueError(f"projection_accept: expected 'closer' or 'always', got {projection_accept!r}")
        self.projection_accept = projection_accept

        if conv is not None:
            if not isinstance(conv, ConvSpec):
                raise ValueError(f"conv: expected a ConvSpec, got {type(conv).__name__}")
            if math.prod(conv.in_shape) != layer_sizes[0]:
                raise ValueError(
                    f"conv: in_shape {conv.in_shape} has {math.prod(conv.in_shape)} features, "
                    f"layer_sizes[0] is {layer_sizes[0]}"
                )
            if min(conv.out_hw) < 1 or conv.out_features != layer_sizes[1]:
                raise ValueError(f"conv: output has {conv.out_features} features, layer_sizes[1] is {layer_sizes[1]}")
            if N < 2:
                raise ValueError("conv: expected at least one linear layer after the conv layer")
            if conv.flatten not in FLATTEN_ORDERS:
                raise ValueError(f"conv: flatten expected one of {FLATTEN_ORDERS}, got {conv.flatten!r}")
        self.conv = conv
        # layer 1's weight as its structure sees it: columns in the conv's declared flatten order
        # (internally the conv features are channel-major, c * P + p)
        self._col_perm: dict[int, Tensor] = {}
        if conv is not None and conv.flatten == "positions":
            perm = torch.arange(conv.out_features).view(conv.out_channels, conv.positions).T.reshape(-1)
            self._col_perm[1] = perm

        self.tt_specs: dict[int, TTSpec | ReshapedTTSpec] = {}
        for i, spec in dict(tt_layers or {}).items():
            if not isinstance(i, int) or not 0 <= i < N:
                raise ValueError(f"tt_layers: expected weight indices in 0..{N - 1}, got {i!r}")
            if conv is not None and i == 0:
                raise ValueError("tt_layers[0]: the conv layer cannot be TT-constrained")
            self.tt_specs[i] = resolve_tt_spec(spec, layer_sizes[i], layer_sizes[i + 1], f"tt_layers[{i}]")
        self.sparsity: dict[int, float] = {}
        for i, s in dict(prune or {}).items():
            if not isinstance(i, int) or not 0 <= i < N:
                raise ValueError(f"prune: expected weight indices in 0..{N - 1}, got {i!r}")
            if i in self.tt_specs:
                raise ValueError(f"prune[{i}]: layer {i} is already TT-constrained")
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 <= s < 1:
                raise ValueError(f"prune[{i}]: expected a sparsity in [0, 1), got {s!r}")
            self.sparsity[i] = float(s)
        self.N = N
        self.history_: dict[str, list] = {}
        self.n_iter_ = 0

    # ------------------------------------------------------------------ helpers
    @property
    def constrained(self) -> list[int]:
        return sorted([*self.tt_specs, *self.sparsity])

    def _weight_shape(self, i: int) -> tuple[int, int]:
        if i == 0 and self.conv is not None:
            return self.conv.out_channels, self.conv.patch_size
        return self.layer_sizes[i + 1], self.layer_sizes[i]

    def _patches(self, X: Tensor) -> Tensor:
        """Samples (n, C*H*W) -> patch columns (C k^2, P * n), column index p * n + sample."""
        c = self.conv
        assert c is not None  # _input calls this only for a model with a conv layer
        P = F.unfold(X.reshape(-1, *c.in_shape), c.kernel_size, stride=c.stride)  # (n, C k^2, P)
        return P.permute(1, 2, 0).reshape(c.patch_size, -1).contiguous()

    def _input(self, X: Tensor) -> Tensor:
        """V_0 in layer 0's weight layout: X^T (d_0, n), or the patches (C k^2, P n) with a conv."""
        return self._patches(X) if self.conv is not None else X.T.contiguous()

    def _wl(self, i: int, T: Tensor) -> Tensor:
        """Layer i's output (d_{i+1}, n) viewed in its weight layout (out_channels, P n for the conv)."""
        return T.view(self.conv.out_channels, -1) if (i == 0 and self.conv is not None) else T

    def _fl(self, i: int, T: Tensor) -> Tensor:
        """Layer i's output in weight layout viewed as features (d_{i+1}, n)."""
        return T.view(self.layer_sizes[i + 1], -1) if (i == 0 and self.conv is not None) else T

    def _inp(self, i: int) -> Tensor:
        return self.V0 if i == 0 else self.V[i - 1]

    def _target(self, i: int) -> Tensor:
        """T_i of a constrained layer i."""
        target = self.targets_[i]
        assert target is not None  # every constrained layer has its T_i from initialize() on
        return target

    def _canonical(self, i: int, W: Tensor) -> Tensor:
        """W_i with its columns in the order its structure sees them (see ConvSpec.flatten)."""
        return W[:, self._col_perm[i]] if i in self._col_perm else W

    def _from_canonical(self, i: int, T: Tensor) -> Tensor:
        if i not in self._col_perm:
            return T
        out = torch.empty_like(T)
        out[:, self._col_perm[i]] = T
        return out

    def _tt_projection(self, W: Tensor, spec, ranks, state: dict | None) -> tuple[list[Tensor], Tensor]:
        """TT-SVD of a batch W (b, M, N) (canonical column order) in the spec's format."""
        if isinstance(spec, ReshapedTTSpec):
            return tt_project_reshaped(W, spec.shape, ranks, self.svd_method, self._gen, state)
        return tt_project(W, spec.out_factors, spec.in_factors, ranks, self.svd_method, self._gen, state)

    def _project(self, idx: list[int], initial: bool = False) -> None:
        """T_i <- projection of W_i for the given constrained layers; same-shape TT layers batched.
        With projection_accept="closer" a TT projection replaces the old one only if it is at
        least as close to W_i. initial: the first target of init="normal" (every bond capped at
        init_target_rank when given; always accepted, no warm-start state)."""
        groups: dict[TTSpec | ReshapedTTSpec, list[int]] = {}
        for i in idx:
            if i in self.sparsity:
                self.targets_[i] = prune_projection(self.weights_[i], self.sparsity[i])
            else:
                groups.setdefault(self.tt_specs[i], []).append(i)
        for spec, members in groups.items():
            ranks, state = spec.ranks, None
            if not initial:
                state = self._svd_state.setdefault(_spec_key(spec), {})
            elif self.init_target_rank is not None:
                ranks = _ranks_capped_at(spec, self.init_target_rank)
            W = torch.stack([self._canonical(i, self.weights_[i]) for i in members])
            cores, dense = self._tt_projection(W, spec, ranks, state)
            for b, i in enumerate(members):
                new = self._from_canonical(i, dense[b]).contiguous()
                old = self.targets_[i]
                if (
                    not initial
                    and self.projection_accept == "closer"
                    and old is not None
                    and torch.linalg.vector_norm(self.weights_[i] - new)
                    > torch.linalg.vector_norm(self.weights_[i] - old)
                ):
                    continue
                self.targets_[i] = new
                self.cores_[i] = [c[b].contiguous() for c in cores]

    def effective_weights(self) -> list[Tensor]:
        """The weights used at inference: T_i (TT reconstruction / pruned) for constrained layers, else W_i."""
        return [w if t is None else t for w, t in zip(self.weights_, self.targets_)]

    # ------------------------------------------------------------------ validation
    def _check_xy(self, X, Y, xname="X", yname="Y", labels_ok=False) -> tuple[Tensor, Tensor | None]:
        if not isinstance(X, Tensor) or X.dim() != 2 or not X.is_floating_point():
            raise ValueError(
                f"{xname}: expected a 2-d floating-point tensor (n_samples, {self.layer_sizes[0]}), "
                f"got {getattr(X, 'shape', type(X).__name__)}"
            )
        if X.shape[1] != self.layer_sizes[0]:
            raise ValueError(
                f"{xname}: expected {self.layer_sizes[0]} features (layer_sizes[0]), got shape {tuple(X.shape)}"
            )
        if X.shape[0] < 1 or not torch.isfinite(X).all():
            raise ValueError(f"{xname}: expected at least one sample and finite values, found NaN/Inf or no rows")
        if Y is None:
            return X, None
        if not isinstance(Y, Tensor):
            raise ValueError(f"{yname}: expected a tensor, got {type(Y).__name__}")
        C = self.layer_sizes[-1]
        if labels_ok and Y.dim() == 1:
            if Y.shape[0] != X.shape[0]:
                raise ValueError(f"{yname}: expected {X.shape[0]} labels like {xname}, got {Y.shape[0]}")
            if Y.is_floating_point() and not torch.equal(Y, Y.round()) or Y.numel() and (Y.min() < 0 or Y.max() >= C):
                raise ValueError(f"{yname}: expected integer labels in [0, {C}), got values outside")
            return X, Y.long()
        if Y.dim() != 2 or Y.shape[0] != X.shape[0] or Y.shape[1] != C:
            raise ValueError(
                f"{yname}: expected one-hot of shape ({X.shape[0]}, {C}) (n_samples of {xname}, "
                f"layer_sizes[-1]), got {tuple(Y.shape)}"
            )
        Yf = Y.to(torch.float64)
        if not torch.isfinite(Yf).all() or not ((Yf == 0) | (Yf == 1)).all() or not (Yf.sum(1) == 1).all():
            raise ValueError(
                f"{yname}: expected one-hot rows (entries 0/1, one 1 per row); use "
                "tensorpress.train.one_hot(labels, num_classes)"
            )
        return X, Y

    def _check_xy_given(self, X, Y, xname="X", yname="Y", labels_ok=False) -> tuple[Tensor, Tensor]:
        """_check_xy where Y is required."""
        X, Y = self._check_xy(X, Y, xname, yname, labels_ok)
        if Y is None:
            raise ValueError(f"{yname}: expected a tensor, got None")
        return X, Y

    # ------------------------------------------------------------------ state
    def _setup(self, X: Tensor, Y: Tensor) -> None:
        """The data-dependent, deterministic part of the state: device, V_0, Y, n, the scaled weights."""
        X, Y = self._check_xy_given(X, Y)
        dev = torch.device(self.device) if self.device is not None else X.device
        self.device_ = dev
        X = X.to(dev, self.dtype)
        n = X.shape[0]
        self.n_samples_ = n
        k = n if self.scale == "n" else 1
        self.tau_eff, self.alpha_w_eff, self.decay_eff = self.tau * k, self.alpha_w * k, self.weight_decay * k
        self.Y = Y.to(dev, self.dtype).T.contiguous()
        self._data_fingerprint = self._fingerprint(X, Y)
        self.V0 = self._input(X)
        self._col_perm = {i: p.to(dev) for i, p in self._col_perm.items()}
        self._gen = (
            torch.Generator(device=dev).manual_seed(self.seed + 1)
            if dev.type == "cuda"
            else torch.Generator().manual_seed(self.seed + 1)
        )
        self._factor0: GramFactor | None = None
        self._svd_state: dict = {}  # per TT group: the previous singular subspaces (warm starts)
        self._block = ""
        self.n_iter_ = 0
        self.history_ = {k: [] for k in HISTORY_KEYS}

    def initialize(self, X: Tensor, Y: Tensor) -> TenBCD:
        """Validate (X, Y) and set up the state: random weights (init="tt": TT layers start
        exactly on random TT cores, so the gap is 0; init="normal": init_std * N(0, 1) entries and
        the first targets by projection), U, V by a forward pass, T_i, cached factorizations."""
        self._setup(X, Y)
        dev = self.device_
        g = torch.Generator(device="cpu").manual_seed(self.seed)
        self.weights_: list[Tensor] = []
        self.targets_: list[Tensor | None] = [None] * self.N  # T_i of the constrained layers
        self.cores_: list[list[Tensor] | None] = [None] * self.N  # the TT layers' cores
        for i in range(self.N):
            m, k = self._weight_shape(i)
            if self.init == "normal":
                self.weights_.append(
                    (torch.randn(m, k, generator=g, dtype=torch.float64) * self.init_std).to(dev, self.dtype)
                )
                continue
            var = (self.init_gain if i < self.N - 1 else 1.0) / k
            if i in self.tt_specs:
                spec = self.tt_specs[i]
                cores = _random_tt_cores(spec, var, g)
                W = self._from_canonical(i, _dense_of(cores, spec).to(dev))
                self.cores_[i] = [c.to(dev, self.dtype) for c in cores]
                self.targets_[i] = W.to(dev, self.dtype)
            else:
                W = torch.randn(m, k, generator=g, dtype=torch.float64) * math.sqrt(var)
                if i in self.sparsity:
                    W = prune_projection(W, self.sparsity[i])
                    self.targets_[i] = W.to(dev, self.dtype)
            self.weights_.append(W.to(dev, self.dtype))
        if self.init == "normal":
            self._project(sorted(self.sparsity))
            self._project(sorted(self.tt_specs), initial=True)
        self.U, self.V, self.P = [], [], []
        inp = self.V0
        for i in range(self.N):
            P = self._fl(i, blas.mm(self.weights_[i], inp))
            self.P.append(P)
            self.U.append(P.clone())
            self.V.append(P.clamp_min(0.0) if i < self.N - 1 else P.clone())
            inp = self.V[i]
        return self

    # ------------------------------------------------------------------ objective
    def objective(self, terms: bool = False):
        """F at the current state, computed from scratch (in float64 accumulation)."""
        rho, gamma = self.rho, self.gamma
        t = {"fit": 0.5 * _sq(self.V[-1] - self.Y), "coupling": 0.0, "relu": 0.0, "constraint": 0.0, "decay": 0.0}
        for i in range(self.N):
            inp = self._inp(i)
            P = self._fl(i, blas.mm(self.weights_[i], inp))
            t["coupling"] += 0.5 * rho * _sq(self.U[i] - P)
            t["relu"] += 0.5 * gamma * _sq(self.V[i] - (self.U[i].clamp_min(0.0) if i < self.N - 1 else self.U[i]))
            target = self.targets_[i]
            if target is not None and i in self.constrained:
                t["constraint"] += 0.5 * self.tau_eff * _sq(self.weights_[i] - target)
            if self.decay_eff:
                t["decay"] += 0.5 * self.decay_eff * _sq(self.weights_[i])
        total = sum(t.values())
        return (total, t) if terms else total

    def _objective_cached(self) -> float:
        """F using the cached products P_i = W_i V_{i-1}, which step() keeps current (each V_i
        update returns W_{i+1} V_i; P_0 is recomputed at the end of the sweep)."""
        f = 0.5 * _sq(self.V[-1] - self.Y)
        for i in range(self.N):
            f += 0.5 * self.rho * _sq(self.U[i] - self.P[i])
            f += 0.5 * self.gamma * _sq(self.V[i] - (self.U[i].clamp_min(0.0) if i < self.N - 1 else self.U[i]))
            if i in self.constrained:
                f += 0.5 * self.tau_eff * _sq(self.weights_[i] - self._target(i))
            if self.decay_eff:
                f += 0.5 * self.decay_eff * _sq(self.weights_[i])
        return f

    def tt_gaps(self) -> dict[int, float]:
        """||W_i - T_i|| / ||W_i|| per constrained layer."""
        return {
            i: (
                torch.linalg.vector_norm(self.weights_[i] - self._target(i))
                / torch.linalg.vector_norm(self.weights_[i]).clamp_min(1e-30)
            ).item()
            for i in self.constrained
        }

    # ------------------------------------------------------------------ one iteration
    def _w_update(self, i: int) -> None:
        tau = self.tau_eff if i in self.constrained else 0.0
        factor = None
        if i == 0:  # V_0 never changes: its Gram factorization is computed once
            if self._factor0 is None:
                self._factor0 = gram_factor(self.V0, self.rho, self.alpha_w_eff + tau + self.decay_eff)
            factor = self._factor0
        self.weights_[i] = update_w(
            self.weights_[i],
            self._wl(i, self.U[i]),
            self._inp(i),
            self.rho,
            self.alpha_w_eff,
            tau,
            self.targets_[i] if tau else None,
            factor,
            decay=self.decay_eff,
        )

    def step(self, trace_blocks: bool = False) -> list[tuple[str, float]] | None:
        """One full-batch tenBCD iteration (output layer back to the first). With trace_blocks,
        returns [(block, F after it)] (F recomputed from scratch after each block: slow, for checks).
        The cached products P_i must be current (they are after initialize() and each step())."""
        L, g, r, a = self.N - 1, self.gamma, self.rho, self.alpha
        trace: list[tuple[str, float]] | None = [] if trace_blocks else None
        # ||x_{k+1} - x_k||^2 over every block (the T_i stand in for the TT cores), for the O(1/k) check
        self._step_sq = 0.0

        def moved(old, new):
            self._step_sq += _sq(new - old)

        def mark(name):
            if trace is not None:
                trace.append((name, self.objective()))

        self._block = f"V[{L}]"
        old = self.V[L]
        self.V[L] = update_v_out(self.Y, self.U[L], self.V[L], g, a)
        moved(old, self.V[L])
        mark(f"V[{L}]")
        self._block = f"U[{L}]"
        old = self.U[L]
        self.U[L] = update_u_out(self.V[L], self.P[L], g, r)
        moved(old, self.U[L])
        mark(f"U[{L}]")
        self._block = f"W[{L}]"
        old = self.weights_[L]
        self._w_update(L)
        moved(old, self.weights_[L])
        mark(f"W[{L}]")
        for i in range(L - 1, -1, -1):
            self._block = f"V[{i}]"
            old = self.V[i]
            self.V[i], WV = update_v_hidden(
                self.weights_[i + 1], self._wl(i + 1, self.U[i + 1]), self.U[i].clamp_min(0.0), g, r, with_product=True
            )
            # W_{i+1} is final for this sweep and P_{i+1} was used already (by U_{i+1}): cache the product
            self.P[i + 1] = self._fl(i + 1, WV)
            moved(old, self.V[i])
            mark(f"V[{i}]")
            self._block = f"U[{i}]"
            old = self.U[i]
            self.U[i] = update_u_hidden(self.V[i], self.P[i], self.U[i], g, r, a)
            moved(old, self.U[i])
            mark(f"U[{i}]")
            self._block = f"W[{i}]"
            old = self.weights_[i]
            self._w_update(i)
            moved(old, self.weights_[i])
            mark(f"W[{i}]")
            if trace is not None and i in self.constrained:  # projections are batched at the end otherwise
                self._block = f"T[{i}]"
                old_target = self.targets_[i]
                self._project([i])
                moved(old_target, self.targets_[i])
                mark(f"T[{i}]")
        self.P[0] = self._fl(0, blas.mm(self.weights_[0], self.V0))
        if trace is None:
            # T_i is used only by W_i's next update and by F, so projecting every layer after the
            # sweep gives the same result as projecting each right after its W update, batched.
            self._block = "T (projections)"
            old_targets = list(self.targets_)
            self._project(self.constrained)
            for i in self.constrained:
                moved(old_targets[i], self.targets_[i])
        return trace

    def _locate_nonfinite(self) -> str:
        """The first block, in update order, holding a non-finite value."""
        L = self.N - 1
        order = [("V", L), ("U", L), ("W", L)] + [(b, i) for i in range(L - 1, -1, -1) for b in ("V", "U", "W")]
        store = {"V": self.V, "U": self.U, "W": self.weights_}
        for b, i in order:
            if not torch.isfinite(store[b][i]).all():
                return f"{b}[{i}]"
        for i in self.constrained:
            if not torch.isfinite(self._target(i)).all():
                return f"T[{i}] (projection)"
        return "objective (overflow)"

    # ------------------------------------------------------------------ fit
    def fit(
        self,
        X: Tensor,
        Y: Tensor,
        n_iter: int = 100,
        X_test: Tensor | None = None,
        y_test: Tensor | None = None,
        eval_every: int = 1,
        refit_output: bool = False,
        callback: Callable[[TenBCD, dict], None] | None = None,
        verbose: bool = False,
        checkpoint: str | os.PathLike | None = None,
        checkpoint_every: int = 10,
        resume: bool = False,
        progress: bool = False,
    ) -> TenBCD:
        """Run iterations up to n_iter, from a fresh initialization (or from a checkpoint).

        X (n, d_0) finite floats, Y (n, d_N) one-hot; X_test (m, d_0), y_test (m,) labels or
        (m, d_N) one-hot. Every eval_every iterations records train/test accuracy with the
        TT/pruned weights (and test accuracy with the free W); F, the gaps and the update time
        every iteration. refit_output: finish with refit_output() (the output layer's least
        squares on the TT network's own hidden outputs). callback(self, record) after each iteration.
        checkpoint: a file the full state is written to (atomically) every checkpoint_every
        iterations and after the last (see save_checkpoint); with resume=True and the file
        present, the run continues from it (same data and settings required) and ends in the
        bit-identical state an uninterrupted run reaches (n_iter is the total, not a count more).
        progress: a tqdm progress bar with F and the latest accuracies.
        Raises DivergenceError (naming iteration and block) if F becomes non-finite.
        """
        if not is_int(n_iter) or n_iter < 0:
            raise ValueError(f"n_iter: expected an int >= 0, got {n_iter!r}")
        if not is_int(eval_every) or eval_every < 1:
            raise ValueError(f"eval_every: expected an int >= 1, got {eval_every!r}")
        if not is_int(checkpoint_every) or checkpoint_every < 1:
            raise ValueError(f"checkpoint_every: expected an int >= 1, got {checkpoint_every!r}")
        if resume and checkpoint is None:
            raise ValueError("resume: needs a checkpoint path")
        self._check_xy(X, Y)
        if (X_test is None) != (y_test is None):
            raise ValueError("X_test, y_test: expected both or neither")
        if X_test is not None:
            X_test, y_checked = self._check_xy_given(X_test, y_test, "X_test", "y_test", labels_ok=True)
            y_test = y_checked if y_checked.dim() == 1 else y_checked.argmax(1)
        if resume and checkpoint is not None and Path(checkpoint).exists():  # resume needs a checkpoint (above)
            self.load_checkpoint(checkpoint, X, Y)
        else:
            self.initialize(X, Y)
        Xd = X.to(self.device_, self.dtype)
        y_train = Y.argmax(1).to(self.device_)
        if X_test is not None:
            assert y_test is not None  # both or neither (checked above)
            X_test, y_test = X_test.to(self.device_, self.dtype), y_test.to(self.device_)
        sync = (lambda: torch.cuda.synchronize(self.device_)) if self.device_.type == "cuda" else (lambda: None)
        start = self.n_iter_ + 1
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=n_iter, initial=start - 1, desc="tenBCD", unit="it", dynamic_ncols=True)
        try:
            for it in range(start, n_iter + 1):
                rec = self._iterate(it, Xd, y_train, X_test, y_test, eval_every, n_iter, sync)
                if verbose:
                    print(
                        f"tenBCD it {it:4d}  F={rec['objective']:.4e}  train={rec['train_acc']}  "
                        f"test={rec['test_acc']}  gap={max(rec['tt_gap'].values(), default=0):.3f}  "
                        f"{rec['time_update_s']:.3f}s",
                        flush=True,
                    )
                if bar is not None:
                    post = {"F": f"{rec['objective']:.4g}"}
                    acc = {k: v for k, v in self._latest_accuracies().items() if v is not None}
                    post.update({k: f"{100 * v:.2f}%" for k, v in acc.items()})
                    bar.set_postfix(post, refresh=False)
                    bar.update(1)
                if checkpoint is not None and (it % checkpoint_every == 0 or it == n_iter):
                    self.save_checkpoint(checkpoint)
                if callback is not None:
                    callback(self, rec)
        finally:
            if bar is not None:
                bar.close()
        if refit_output:
            self.refit_output(X, Y)
        return self

    def _iterate(self, it, Xd, y_train, X_test, y_test, eval_every, n_iter, sync) -> dict:
        """One iteration of fit(): the sweep, F, the evaluation, the history record."""
        sync()
        t0 = time.perf_counter()
        try:
            self.step()
            f = self._objective_cached()
        except (SolveError, torch.linalg.LinAlgError, ValueError) as e:  # ValueError: SVD of non-finite W
            raise DivergenceError(f"iteration {it}, block {self._block}: {e}") from None
        sync()
        t1 = time.perf_counter()
        if not math.isfinite(f):
            raise DivergenceError(
                f"iteration {it}: objective is {f}; first non-finite block: "
                f"{self._locate_nonfinite()} (try smaller gamma/rho or larger alpha)"
            )
        rec = {
            "iteration": it,
            "objective": f,
            "tt_gap": self.tt_gaps(),
            "time_update_s": t1 - t0,
            "step_sq": self._step_sq,
            "train_acc": None,
            "test_acc": None,
            "test_acc_free_w": None,
        }
        if it % eval_every == 0 or it == n_iter:
            rec["train_acc"] = self._accuracy(Xd, y_train)
            if X_test is not None:
                rec["test_acc"] = self._accuracy(X_test, y_test)
                rec["test_acc_free_w"] = self._accuracy(X_test, y_test, self.weights_)
        sync()
        rec["time_eval_s"] = time.perf_counter() - t1
        for k, v in rec.items():
            self.history_[k].append(v)
        self.n_iter_ = it
        return rec

    def _latest_accuracies(self) -> dict[str, float | None]:
        """The most recent recorded train and test accuracy (TT/pruned weights)."""
        out = {}
        for key, name in (("train_acc", "train"), ("test_acc", "test")):
            vals = [v for v in self.history_.get(key, []) if v is not None]
            out[name] = vals[-1] if vals else None
        return out

    # ------------------------------------------------------------------ checkpoints
    def _settings(self) -> dict:
        """The constructor's settings as plain values (a checkpoint resumes only under the same)."""
        conv = self.conv
        return {
            "layer_sizes": list(self.layer_sizes),
            "tt_layers": {i: _spec_key(s) for i, s in self.tt_specs.items()},
            "prune": dict(self.sparsity),
            "gamma": self.gamma,
            "rho": self.rho,
            "alpha": self.alpha,
            "tau": self.tau,
            "alpha_w": self.alpha_w,
            "weight_decay": self.weight_decay,
            "scale": self.scale,
            "conv": None
            if conv is None
            else (tuple(conv.in_shape), conv.out_channels, conv.kernel_size, conv.stride, conv.flatten),
            "svd_method": self.svd_method,
            "init": self.init,
            "init_gain": self.init_gain,
            "init_std": self.init_std,
            "init_target_rank": self.init_target_rank,
            "projection_accept": self.projection_accept,
            "dtype": str(self.dtype),
            "seed": self.seed,
        }

    @staticmethod
    def _fingerprint(X: Tensor, Y: Tensor) -> str:
        """sha256 of the training data's bytes (as float32 / int64 on the CPU): a resume on other data is refused."""
        h = hashlib.sha256()
        h.update(str(tuple(X.shape)).encode())
        h.update(X.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        h.update(Y.detach().to("cpu", torch.float32).argmax(1).numpy().tobytes())
        return h.hexdigest()

    def save_checkpoint(self, path: str | os.PathLike) -> None:
        """Write the full state to ``path`` (atomically: a temporary file renamed over it).

        Holds the settings, a fingerprint of the training data, every block (W_i, T_i, TT cores,
        U_i, V_i, the cached products P_i), the first layer's Gram factorization, the TT-SVD's
        warm-start subspaces, the random generator's state, the iteration count and the history:
        what load_checkpoint needs to continue bit-identically. V_0 and Y are rebuilt from the data.
        """
        self._require_fitted()
        cpu = lambda t: None if t is None else t.detach().to("cpu")  # noqa: E731
        f0 = self._factor0
        state = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "settings": self._settings(),
            "data": self._data_fingerprint,
            "n_iter": self.n_iter_,
            "history": self.history_,
            "weights": [cpu(w) for w in self.weights_],
            "targets": [cpu(t) for t in self.targets_],
            "cores": [None if c is None else [cpu(g) for g in c] for c in self.cores_],
            "U": [cpu(t) for t in self.U],
            "V": [cpu(t) for t in self.V],
            "P": [cpu(t) for t in self.P],
            "factor0": None if f0 is None else (cpu(f0.L), f0.woodbury, f0.c),
            "svd_state": [(k, {b: cpu(t) for b, t in v.items()}) for k, v in self._svd_state.items()],
            "generator": self._gen.get_state().cpu(),
        }
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)

    def load_checkpoint(self, path: str | os.PathLike, X: Tensor, Y: Tensor) -> TenBCD:
        """Restore the state save_checkpoint wrote, for the same training data (X, Y) and settings.

        ValueError if the file is not a tenBCD checkpoint, or was written under other settings or
        for other data (each named)."""
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"checkpoint: {path} is not a tenBCD checkpoint")
        if state.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"checkpoint: version {state.get('version')!r}, expected {CHECKPOINT_VERSION}")
        mine = self._settings()
        diff = sorted(k for k in mine.keys() | state["settings"].keys() if mine.get(k) != state["settings"].get(k))
        if diff:
            raise ValueError(
                "checkpoint: written under other settings: "
                + ", ".join(f"{k} = {state['settings'].get(k)!r} (this model: {mine.get(k)!r})" for k in diff)
            )
        self._setup(X, Y)
        if state["data"] != self._data_fingerprint:
            raise ValueError("checkpoint: written for other training data (X, Y differ)")
        dev, dt = self.device_, self.dtype

        def on(t: Tensor) -> Tensor:
            return t.to(dev)

        def on_or_none(t: Tensor | None) -> Tensor | None:  # T_i and the SVD states may be None
            return None if t is None else on(t)

        self.weights_ = [on(w) for w in state["weights"]]
        self.targets_ = [on_or_none(t) for t in state["targets"]]
        self.cores_ = [None if c is None else [on(g) for g in c] for c in state["cores"]]
        self.U, self.V = [on(t) for t in state["U"]], [on(t) for t in state["V"]]
        self.P = [on(t) for t in state["P"]]
        if any(w.dtype != dt for w in self.weights_):
            raise ValueError(f"checkpoint: weights in {self.weights_[0].dtype}, this model uses {dt}")
        if state["factor0"] is not None:
            L, woodbury, c = state["factor0"]
            self._factor0 = GramFactor(on(L), woodbury, c)
        self._svd_state = {k: {b: on_or_none(t) for b, t in v.items()} for k, v in state["svd_state"]}
        self._gen.set_state(state["generator"])
        self.history_ = {k: list(state["history"].get(k, [None] * state["n_iter"])) for k in HISTORY_KEYS}
        self.n_iter_ = state["n_iter"]
        return self

    def refit_output(self, X: Tensor, Y: Tensor, ridge: float | str = "gcv") -> TenBCD:
        """W_N <- argmin ||Y - W H||^2 + lam ||W||^2 with H the TT network's own last hidden outputs
        on X; projected again if the output layer is constrained.

        ridge: "gcv" (default): lam minimizing the generalized cross-validation score over a grid
        (closed form from one eigendecomposition of H H^T; an unregularized refit overfits small
        training sets); or a float: lam = ridge * mean diag(H H^T). The chosen lam is in ``refit_ridge_``.
        """
        self._require_fitted()
        X, Y = self._check_xy_given(X, Y)
        scale = None if ridge == "gcv" else _check_number("ridge", ridge)  # None: by GCV
        # float64 throughout: with fewer samples than hidden units H H^T is singular, and a float32
        # Gram's rounding (negative eigenvalues ~1e-7 ||G||) would swamp a small chosen lam
        H = self._forward(X.to(self.device_, self.dtype), self.effective_weights(), upto=self.N - 1).double()
        Yc = Y.to(self.device_, torch.float64).T
        G, B = H @ H.T, Yc @ H.T  # B = Y H^T (C x d)
        e, Q = torch.linalg.eigh(G)
        e = e.clamp_min(0.0)
        lam = (
            gcv_ridge(G, B, float(Yc.square().sum()), H.shape[1], eig=(e, Q))
            if scale is None
            else scale * float(G.diagonal().mean()) + 1e-12
        )
        self.refit_ridge_ = lam
        # W = B (G + lam I)^{-1} through G's eigenvectors (lam > 0 unless H = 0, whose refit is W = 0)
        inv = torch.where(e + lam > 0, 1.0 / (e + lam), torch.zeros_like(e))
        self.weights_[-1] = (((B @ Q) * inv) @ Q.T).to(self.dtype).contiguous()
        self.P[-1] = self._fl(self.N - 1, blas.mm(self.weights_[-1], self._inp(self.N - 1)))
        if self.N - 1 in self.constrained:
            self.targets_[-1] = None
            self._project([self.N - 1])
        return self

    # ------------------------------------------------------------------ inference
    def _require_fitted(self):
        if not getattr(self, "weights_", None):
            raise RuntimeError("TenBCD: call fit() (or initialize()) first")

    def _forward(self, X: Tensor, weights: Sequence[Tensor], upto: int | None = None) -> Tensor:
        """Columns (d_k, n) of layer `upto`'s input (default: the network's output)."""
        upto = self.N if upto is None else upto
        h = self._input(X)
        for i in range(upto):
            h = self._fl(i, weights[i] @ h)
            if i < self.N - 1:
                h = h.clamp_min(0.0)
        return h

    def decision_function(self, X: Tensor, use_free_weights: bool = False) -> Tensor:
        """Network outputs (n, d_N) with the TT/pruned weights (or the free W with use_free_weights)."""
        self._require_fitted()
        X, _ = self._check_xy(X, None)
        w = self.weights_ if use_free_weights else self.effective_weights()
        return self._forward(X.to(self.device_, self.dtype), w).T

    def predict(self, X: Tensor, use_free_weights: bool = False) -> Tensor:
        """Class indices (n,) by the TT/pruned network."""
        return self.decision_function(X, use_free_weights).argmax(1)

    def _accuracy(self, X: Tensor, y: Tensor, weights=None) -> float:
        out = self._forward(X, self.effective_weights() if weights is None else weights)
        return (out.argmax(0) == y).double().mean().item()

    def score(self, X: Tensor, y: Tensor) -> float:
        """Accuracy with the TT/pruned weights; y labels (n,) or one-hot."""
        self._require_fitted()
        X, y = self._check_xy_given(X, y, "X", "y", labels_ok=True)
        y = y if y.dim() == 1 else y.argmax(1)
        return self._accuracy(X.to(self.device_, self.dtype), y.to(self.device_))

    def to_torch(self) -> nn.Sequential:
        """The inference network: [Unflatten, Conv2d, ReLU, Flatten,] then TTLinear (TT layers,
        the current cores) or Linear (others, pruned weights for pruned layers), ReLU between;
        bias-free, in this model's dtype and device. Input (n, d_0) rows, output (n, d_N)."""
        from tensorpress.nn import TTLinear

        self._require_fitted()
        mods: list[nn.Module] = []
        eff = self.effective_weights()
        for i in range(self.N):
            if i == 0 and self.conv is not None:
                c = self.conv
                conv = nn.Conv2d(
                    c.in_shape[0],
                    c.out_channels,
                    c.kernel_size,
                    stride=c.stride,
                    bias=False,
                    device=self.device_,
                    dtype=self.dtype,
                )
                with torch.no_grad():
                    conv.weight.copy_(eff[0].reshape(conv.weight.shape))
                mods += [nn.Unflatten(1, c.in_shape), conv, nn.ReLU(), nn.Flatten()]
                continue
            din, dout = self.layer_sizes[i], self.layer_sizes[i + 1]
            s = self.tt_specs.get(i)
            if isinstance(s, TTSpec):
                cores = self.cores_[i]
                assert cores is not None  # a TT layer has its cores from initialize() on
                tt = TTLinear(
                    din,
                    dout,
                    [g.shape[-1] for g in cores[:-1]],
                    s.in_factors,
                    s.out_factors,
                    bias=False,
                    device=self.device_,
                    dtype=self.dtype,
                )
                with torch.no_grad():
                    for p, g in zip(tt.cores, cores):
                        p.copy_(g)
                mods.append(tt)
            else:
                linear = nn.Linear(din, dout, bias=False, device=self.device_, dtype=self.dtype)
                with torch.no_grad():
                    linear.weight.copy_(eff[i])
                mods.append(linear)
            if i < self.N - 1:
                mods.append(nn.ReLU())
        return nn.Sequential(*mods)


# ----------------------------------------------------------------------------- helpers
def gcv_ridge(
    G: Tensor, B: Tensor, y_sq: float, n: int, grid: int = 61, eig: tuple[Tensor, Tensor] | None = None
) -> float:
    """The ridge lam minimizing GCV(lam) = RSS(lam) / (n (1 - df(lam)/n)^2) for W = B (G + lam I)^{-1}.

    G = H H^T (d x d), B = Y H^T (C x d), y_sq = ||Y||^2, n samples (columns of H). With
    G = Q diag(e) Q^T: RSS(lam) = y_sq - sum_j c_j (1 - (lam / (e_j + lam))^2), c_j = ||B q_j||^2 / e_j,
    df(lam) = sum_j e_j / (e_j + lam). lam on a log grid from 1e-8 to 1e2 times mean(e).
    eig: (e, Q) of G when the caller has it (float64).
    """
    e, Q = eig if eig is not None else torch.linalg.eigh(G.double())
    e = e.clamp_min(0.0)
    keep = e > e.max() * 1e-12
    e, c = e[keep], (B.double() @ Q[:, keep]).square().sum(0) / e[keep]
    lams = e.mean() * torch.logspace(-8, 2, grid, dtype=torch.float64, device=e.device)
    shrink = lams[:, None] / (e[None, :] + lams[:, None])  # (grid, k)
    rss = (y_sq - (c[None, :] * (1 - shrink.square())).sum(1)).clamp_min(0.0)
    df = (1 - shrink).sum(1)
    score = rss / (n * (1 - df / n).clamp_min(1e-12).square())
    return float(lams[int(torch.argmin(score))])


def _sq(T: Tensor) -> float:
    """||T||^2 accumulated in float64. A float32 T is summed by rows of 4096 in its own dtype
    (each row's error ~1e-7 of that row), the rows' squares in float64: 8x faster than
    converting T whole, and accurate to ~1e-8 relative."""
    if T.dtype == torch.float64:
        return float(torch.linalg.vector_norm(T) ** 2)
    flat = T.reshape(-1)
    whole = flat.numel() // _SQ_ROW * _SQ_ROW
    total = torch.linalg.vector_norm(flat[:whole].view(-1, _SQ_ROW), dim=1).double().square().sum()
    if whole < flat.numel():
        total = total + torch.linalg.vector_norm(flat[whole:], dtype=torch.float64) ** 2
    return float(total)


_SQ_ROW = 4096


def _core_modes(spec) -> list[tuple[int, ...]]:
    """The middle (non-bond) dims of each core: (m_k, n_k) for a TT-matrix, (shape[k],) for a reshaped TT."""
    if isinstance(spec, ReshapedTTSpec):
        return [(n,) for n in spec.shape]
    return list(zip(spec.out_factors, spec.in_factors))


def _random_tt_cores(spec, var: float, gen: torch.Generator) -> list[Tensor]:
    """Gaussian TT cores (float64) with Var(W_ij) = var: core k has entry variance
    var^(1/d) / (r_{k-1} r_k)^(1/2) (the bond sums multiply the variances by prod_k r_k)."""
    full = (1, *spec.ranks, 1)
    return [
        torch.randn(full[k], *mid, full[k + 1], generator=gen, dtype=torch.float64) * std
        for k, (mid, std) in enumerate(zip(_core_modes(spec), core_stds(spec.ranks, var)))
    ]


def _dense_of(cores: list[Tensor], spec) -> Tensor:
    """The dense weight (canonical column order) of one layer's TT cores."""
    from tensorpress.train.projections import tt_reconstruct

    if isinstance(spec, ReshapedTTSpec):
        return tt_reconstruct_reshaped([c.unsqueeze(0) for c in cores], spec.out_features, spec.in_features)[0]
    return tt_reconstruct([c.unsqueeze(0) for c in cores], spec.out_factors, spec.in_factors)[0]


def _spec_key(spec) -> tuple:
    """A plain-tuple key of a TT spec (the warm-start state's key; checkpoints store plain types)."""
    if isinstance(spec, ReshapedTTSpec):
        return ("reshaped", spec.out_features, spec.in_features, spec.shape, spec.ranks)
    return ("matrix", spec.out_factors, spec.in_factors, spec.ranks)


def _ranks_capped_at(spec, cap: int) -> tuple[int, ...]:
    """The bond ranks a TT-SVD in the spec's format gives with every bond capped at ``cap``."""
    if isinstance(spec, ReshapedTTSpec):
        return reshaped_tt_spec(spec.out_features, spec.in_features, spec.shape, cap).ranks
    caps = max_bond_ranks(spec.out_factors, spec.in_factors)
    return tuple(min(cap, c) for c in caps)
