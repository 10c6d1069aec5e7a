"""TTLinear: a linear layer whose weight is a TT-matrix, run by the fused TT kernel."""

from __future__ import annotations

import ctypes
import math
import warnings
from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor, nn

from tensorpress import _cuda_kernels as cuda_kernels
from tensorpress._eager import plain_eager
from tensorpress._validate import is_int
from tensorpress.decompose.tt import tt_matrix_svd
from tensorpress.nn._checks import autocast_casts, check_factor_dtype
from tensorpress.ops.tt import prepare_tt, select_plan, tt_matmul, tt_to_dense
from tensorpress.ops.tt_plan import TTPlan
from tensorpress.tt_format import core_stds, max_bond_ranks, resolve_factors, tt_params


class TTLinear(nn.Module):
    r"""y = x W^T + b with W (out_features x in_features) held as a tensor train.

    W[(i_1..i_d), (j_1..j_d)] = G_1[:, i_1, j_1, :] ... G_d[:, i_d, j_d, :], with cores
    ``cores[k]`` of shape (r_{k-1}, m_k, n_k, r_k), m = out_factors, n = in_factors.

    Args:
        in_features, out_features: sizes of the input and output.
        ranks: the bond ranks r_1..r_{d-1}: an int for all bonds, or d - 1 ints; each is
            capped at the largest useful rank of its bond.
        in_factors, out_factors: how the dimensions are split (same length d); balanced
            factors are chosen when omitted.
        bias: add a learnable bias.

    Shape:
        input (*, in_features) -> output (*, out_features).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        ranks: int | Sequence[int],
        in_factors: Sequence[int] | None = None,
        out_factors: Sequence[int] | None = None,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if not is_int(v) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        check_factor_dtype(dtype)
        self.in_features, self.out_features = in_features, out_features
        self.in_factors, self.out_factors = resolve_factors(in_features, out_features, in_factors, out_factors)
        self.ranks = _resolve_ranks(ranks, self.out_factors, self.in_factors)
        _warn_if_not_smaller(self.ranks, self.out_factors, self.in_factors)
        full = (1, *self.ranks, 1)
        self.cores = nn.ParameterList(
            nn.Parameter(torch.empty(full[k], m, n, full[k + 1], **factory))
            for k, (m, n) in enumerate(zip(self.out_factors, self.in_factors))
        )
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Cores scaled so the entries of W have nn.Linear's default variance 1 / (3 N).

        With i.i.d. N(0, s_k^2) core entries, Var(W_ij) = prod_k s_k^2 * prod_k r_k; taking
        s_k^2 = (1/(3N))^(1/d) / sqrt(r_{k-1} r_k) gives 1/(3N) for any d and ranks.
        """
        for g, std in zip(self.cores, core_stds([g.shape[3] for g in self.cores[:-1]], 1.0 / (3 * self.in_features))):
            nn.init.normal_(g, 0.0, std)
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    # ------------------------------------------------------------------ forward
    def plan(self, batch: int, dtype: torch.dtype | None = None, training: bool = False) -> TTPlan:
        """The contraction this layer will run for `batch` rows (by FLOP count; may be dense):
        at inference, or with `training` in a step that needs the cores' gradients."""
        return self._plan(self._core_list(), batch, dtype, training)

    @staticmethod
    def _plan(cores: list[Tensor], batch: int, dtype: torch.dtype | None, training: bool = False) -> TTPlan:
        core = cores[0]  # on CUDA the plan also picks the kernel path by the GPU cost model
        return select_plan(
            tuple(tuple(g.shape) for g in cores),
            batch,
            device=str(core.device),
            dtype=dtype or core.dtype,
            training=training,
        )

    @property
    def core_shapes(self) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(g.shape) for g in self._core_list())

    def _core_list(self) -> list[Tensor]:
        # ParameterList's iterator goes through __getitem__ (about 2 us a core, a good part of
        # a small batch's call); its parameter dict holds the same tensors in index order.
        if torch.compiler.is_compiling():
            return list(self.cores)
        return cast(list[Tensor], list(self.cores._parameters.values()))

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"input: expected a tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"input: expected shape (*, in_features={self.in_features}), got shape {tuple(x.shape)}")
        cores, bias = self._core_list(), self.bias
        if autocast_casts(x, cores[0]):
            # like nn.Linear: input, weight and bias in autocast's dtype (the kernel accumulates
            # the half types in float32), autocast itself off inside
            dtype = torch.get_autocast_dtype(x.device.type)
            with torch.autocast(x.device.type, enabled=False):
                return tt_matmul(
                    x.to(dtype), [g.to(dtype) for g in cores], bias=None if bias is None else bias.to(dtype)
                )
        plan, prepared = self._prepared_for_inference(x, cores)
        # the CPU kernel adds the bias block by block (and sums its gradient the same way)
        return tt_matmul(x, cores, plan=plan, prepared=prepared, bias=bias)

    def _prepared_for_inference(self, x: Tensor, cores: list[Tensor]):
        """Without autograd the merged step matrices depend only on the cores: on the CPU keep
        them between calls. Valid while the cores are the same tensors with the same storage,
        dtype, device and in-place version, and the same values: writes through ``.data``
        (EMA updates, weight clipping, vector_to_parameters) bump no version, so the cached
        cores' values are compared too (bytes, by memcmp: 3 us for four cores at 1024^2 rank 8,
        against 10 us by torch.equal and 8 ms for prepare_tt).
        Not on CUDA, where comparing values would synchronise every call."""
        if not plain_eager(x, *cores) or (torch.is_grad_enabled() and any(g.requires_grad for g in cores)):
            return None, None
        if cuda_kernels.active().emulated and cuda_kernels.active().takes(x):
            return None, None  # the CUDA emulation's CPU tensors stand for CUDA ones: no cache, as on CUDA
        plan = self._plan(cores, math.prod(x.shape[:-1]), x.dtype)
        cached = self.__dict__.get("_inference_cache")
        if cached is None or not cached.valid_for(plan, cores):
            cached = _InferenceCache(plan, cores)
            self.__dict__["_inference_cache"] = cached
        return plan, cached.prepared

    def _apply(self, fn, *args, **kwargs):
        # .to(), .double(), .cuda() ... replace the cores: drop what was prepared from the old ones
        self.__dict__.pop("_inference_cache", None)
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):
        # the cache is derived data (as large as the cores): never pickled, copied or saved
        state = self.__dict__.copy()
        state.pop("_inference_cache", None)
        return state

    # ------------------------------------------------------------------ conversions
    @classmethod
    def from_dense(
        cls,
        linear: nn.Linear,
        ranks: int | Sequence[int] | None = None,
        rel_error: float | None = None,
        in_factors: Sequence[int] | None = None,
        out_factors: Sequence[int] | None = None,
    ) -> TTLinear:
        """A TTLinear approximating `linear` by TT-SVD.

        ranks caps the bond ranks; rel_error sets the per-bond truncation so that
        ||W - W_tt||_F <= rel_error ||W||_F (when no rank cap binds). At least one is needed.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        if ranks is None and rel_error is None:
            raise ValueError("ranks, rel_error: expected at least one of them, got neither")
        w = linear.weight.detach()
        if not torch.isfinite(w).all() or (linear.bias is not None and not torch.isfinite(linear.bias).all()):
            raise ValueError("linear: expected finite weights, found NaN or Inf")
        in_f, out_f = resolve_factors(linear.in_features, linear.out_features, in_factors, out_factors)
        caps = None if ranks is None else _resolve_ranks(ranks, out_f, in_f)
        res = tt_matrix_svd(w, out_f, in_f, max_rank=caps, rel_error=rel_error)
        return cls.from_cores(res.cores, linear.bias, in_f, out_f, device=w.device, dtype=w.dtype)

    @classmethod
    def from_cores(
        cls,
        cores: Sequence[Tensor],
        bias: Tensor | None,
        in_factors: Sequence[int],
        out_factors: Sequence[int],
        device=None,
        dtype=None,
    ) -> TTLinear:
        """A TTLinear holding copies of ``cores`` (r_{k-1}, out_factors[k], in_factors[k], r_k)
        and of ``bias`` (or none), in ``dtype`` on ``device``."""
        ranks = [int(g.shape[3]) for g in cores[:-1]]
        layer = cls(
            math.prod(in_factors),
            math.prod(out_factors),
            ranks,
            in_factors,
            out_factors,
            bias=bias is not None,
            device=device,
            dtype=dtype,
        )
        if layer.core_shapes != tuple(tuple(g.shape) for g in cores):
            raise ValueError(
                f"cores: expected shapes {layer.core_shapes} for these factors, got {[tuple(g.shape) for g in cores]}"
            )
        with torch.no_grad():
            for g, c in zip(layer.cores, cores):
                g.copy_(c)
            if bias is not None:
                assert layer.bias is not None  # built with a bias above
                layer.bias.copy_(bias)
        return layer

    def to_dense(self) -> Tensor:
        """The weight W (out_features x in_features)."""
        return tt_to_dense(self._core_list())

    @property
    def compression_ratio(self) -> float:
        """Dense weight entries per TT parameter (bias not counted)."""
        return (self.in_features * self.out_features) / sum(g.numel() for g in self.cores)

    def extra_repr(self) -> str:
        f = lambda t: "(" + ",".join(map(str, t)) + ")"  # noqa: E731
        return (
            f"{self.in_features} -> {self.out_features}, factors {f(self.in_factors)}->{f(self.out_factors)}, "
            f"ranks {f(self.ranks)}, {self.compression_ratio:.0f}x smaller, bias={self.bias is not None}"
        )


class _InferenceCache:
    """prepare_tt's output for one plan and one state of the cores (see _prepared_for_inference)."""

    def __init__(self, plan: TTPlan, cores: list[Tensor]) -> None:
        self.plan, self.cores = plan, tuple(cores)  # held, so no other tensor can take their place
        self.keys = _storage_keys(cores)
        with torch.no_grad():
            self.values = tuple(g.detach().clone(memory_format=torch.contiguous_format) for g in cores)
            self.prepared = prepare_tt(list(cores), plan)

    def valid_for(self, plan: TTPlan, cores: list[Tensor]) -> bool:
        return (
            plan == self.plan
            and len(cores) == len(self.cores)
            and all(a is b for a, b in zip(cores, self.cores))
            and _storage_keys(cores) == self.keys
            and all(_same_bytes(g, v) for g, v in zip(cores, self.values))
        )


def _libc_memcmp():
    try:
        fn = ctypes.CDLL(None).memcmp
    except (OSError, AttributeError):  # no C library symbols in this process (Windows)
        return None
    fn.argtypes, fn.restype = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t), ctypes.c_int
    return fn


_MEMCMP = _libc_memcmp()


def _same_bytes(a: Tensor, b: Tensor) -> bool:
    """Whether two CPU tensors of one shape and dtype hold the same bytes (NaNs included)."""
    if _MEMCMP is not None and a.is_contiguous() and b.is_contiguous():
        return _MEMCMP(a.data_ptr(), b.data_ptr(), a.numel() * a.element_size()) == 0
    return torch.equal(a, b)


def _storage_keys(cores: Sequence[Tensor]) -> tuple:
    return tuple((g.data_ptr(), g.dtype, g.device, tuple(g.shape), g._version) for g in cores)


def _warn_if_not_smaller(ranks, out_factors, in_factors) -> None:
    params = tt_params(out_factors, in_factors, ranks)
    dense = math.prod(out_factors) * math.prod(in_factors)
    if params > dense:
        warnings.warn(
            f"ranks {tuple(ranks)}: the TT cores hold {params} parameters, more than the dense "
            f"weight's {dense}; lower ranks compress",
            stacklevel=3,
        )


def _resolve_ranks(ranks, out_factors, in_factors) -> tuple[int, ...]:
    d = len(out_factors)
    caps = max_bond_ranks(out_factors, in_factors)
    if isinstance(ranks, bool) or not isinstance(ranks, (int, list, tuple)):
        raise TypeError(f"ranks: expected an int or a list of {d - 1} ints, got {type(ranks).__name__}")
    values = [ranks] * (d - 1) if isinstance(ranks, int) else list(ranks)
    if len(values) != d - 1:
        raise ValueError(f"ranks: expected {d - 1} bond ranks for {d} factors, got {len(values)}")
    if any(not is_int(r) or r < 1 for r in values):
        raise ValueError(f"ranks: expected ints >= 1, got {values}")
    return tuple(min(r, c) for r, c in zip(values, caps))
