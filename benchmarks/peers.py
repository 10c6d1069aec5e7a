"""Peer baselines for TT-matrix ("TT linear") forward passes.

Convention shared by everything here (and by tensorly-torch's BlockTT):

* A TT-matrix with ``d`` cores ``G_k`` of shape ``(r_{k-1}, m_k, n_k, r_k)``,
  ``r_0 = r_d = 1``, where ``m`` are the *output* factors and ``n`` the
  *input* factors, represents the dense matrix
  ``W[(i_1..i_d), (j_1..j_d)] = G_1[:, i_1, j_1, :] @ ... @ G_d[:, i_d, j_d, :]``
  of shape ``(prod m, prod n)``.
* Flat indices are row-major: ``i_1`` / ``j_1`` are the most significant digits,
  i.e. ``x.reshape(B, n_1, ..., n_d)`` and ``y.reshape(B, m_1, ..., m_d)``.
* A linear layer computes ``y = x @ W.T + b`` (``torch.nn.Linear`` layout).

Run ``python benchmarks/peers.py`` for correctness checks and a small timing.
"""

from __future__ import annotations

import math
import statistics
import time

import torch


def tensorly_torch_tt_linear(in_factors, out_factors, rank, dtype=torch.float32):
    """Build tensorly-torch's TT-matrix linear layer, or return None without tltorch.

    Uses ``tltorch.FactorizedLinear(factorization='blocktt',
    implementation='factorized')``. In tltorch, ``'blocktt'`` (class ``BlockTT``)
    is the TT-matrix format; there is no real-valued ``'tt'`` tensorized-matrix
    factorization (only ``'complextt'``). The 'factorized' implementation contracts
    the reshaped input with all cores in one ``torch.einsum`` call and never
    forms ``W``.

    Index convention (verified in ``__main__``): ``in_tensorized_features`` maps to
    the layer's input dimension and ``out_tensorized_features`` to its output.
    The weight's tensorized shape is ``(out_factors, in_factors)``; core ``k``,
    ``layer.weight.factors[k]``, has shape ``(r_{k-1}, m_k, n_k, r_k)``, with
    ``m_k = out_factors[k]``, ``n_k = in_factors[k]``, and the flat in/out indices
    are row-major with factor 0 most significant -- exactly the convention of
    this module, so those cores can be fed to :func:`einsum_chain_tt`.
    ``layer.weight.to_matrix()`` gives the dense ``W`` of shape
    ``(prod out_factors, prod in_factors)`` and ``layer(x) == x @ W.T + layer.bias``.

    ``rank`` is an int bond rank used for every internal bond, i.e. TT ranks
    ``(1, rank, ..., rank, 1)`` (tensorly does not clip over-parametrized ranks).
    """
    try:
        import tltorch  # noqa: F401  (also sets tensorly's backend to pytorch)
    except Exception:
        return None
    in_factors, out_factors = tuple(in_factors), tuple(out_factors)
    if len(in_factors) != len(out_factors):
        raise ValueError("in_factors and out_factors must have the same length")
    ranks = (1,) + (int(rank),) * (len(in_factors) - 1) + (1,)
    return tltorch.FactorizedLinear(
        in_tensorized_features=in_factors,
        out_tensorized_features=out_factors,
        factorization="blocktt",
        rank=ranks,
        implementation="factorized",
        bias=True,
        dtype=dtype,
    )


def einsum_chain_tt(x, cores):
    """Naive core-by-core TT-matrix forward: ``y = x @ W.T`` (no bias).

    ``x``: ``(B, prod n_k)``; ``cores[k]``: ``(r_{k-1}, m_k, n_k, r_k)``;
    returns ``(B, prod m_k)``. One ``torch.einsum`` per core, sweeping from the
    first core to the last, without merging cores; differentiable.

    The running state has shape ``(P, r_{k-1}, n_k, Q)`` where ``P = B * m_1..m_{k-1}``
    (already produced output digits, most significant first) and
    ``Q = n_{k+1}..n_d`` (input digits still to be contracted).
    """
    batch = x.shape[0]
    n = [c.shape[2] for c in cores]
    t = x.reshape(batch, 1, n[0], -1)
    for k, core in enumerate(cores):
        p, _, _, q = t.shape
        t = torch.einsum("prnq,rmns->pmsq", t, core)  # (P, m_k, r_k, Q)
        nxt = n[k + 1] if k + 1 < len(cores) else 1
        t = t.reshape(p * core.shape[1], core.shape[3], nxt, q // nxt)
    return t.reshape(batch, -1)


def dense_from_cores(cores):
    """Dense ``W`` of shape ``(prod m, prod n)`` from TT-matrix cores (reference)."""
    w = cores[0].new_ones(1, 1, 1)
    for core in cores:
        a, b, _ = w.shape
        r, m, n, s = core.shape
        w = torch.einsum("abr,rmns->ambns", w, core).reshape(a * m, b * n, s)
    return w[..., 0]


def _median_ms(fn, reps=20, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _check_einsum_chain():
    g = torch.Generator().manual_seed(0)
    for m, n, r in [((2, 3, 4), (3, 2, 5), 3), ((4, 8, 8, 4), (4, 8, 8, 4), 8), ((5,), (7,), 1)]:
        ranks = (1,) + (r,) * (len(m) - 1) + (1,)
        cores = [
            torch.randn(ranks[k], m[k], n[k], ranks[k + 1], generator=g, dtype=torch.float64, requires_grad=True)
            for k in range(len(m))
        ]
        x = torch.randn(6, math.prod(n), generator=g, dtype=torch.float64)
        y = einsum_chain_tt(x, cores)
        ref = x @ dense_from_cores(cores).T
        assert y.shape == (6, math.prod(m))
        torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
        grads = torch.autograd.grad(y.square().sum(), cores)
        grads_ref = torch.autograd.grad(ref.square().sum(), cores)
        for a, b in zip(grads, grads_ref):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    print("einsum_chain_tt: matches dense float64 reference (values and grads)")


def _check_tltorch():
    in_f, out_f, rank = (2, 3, 4), (5, 2, 3), 4
    layer = tensorly_torch_tt_linear(in_f, out_f, rank, dtype=torch.float64)
    if layer is None:
        print("tltorch not importable: skipped")
        return False
    cores = list(layer.weight.factors)
    print("tltorch BlockTT core shapes:", [tuple(c.shape) for c in cores])
    assert [tuple(c.shape) for c in cores] == [(1, 5, 2, 4), (4, 2, 3, 4), (4, 3, 4, 1)]
    x = torch.randn(7, math.prod(in_f), dtype=torch.float64)
    with torch.no_grad():
        w = layer.weight.to_matrix()
        assert w.shape == (math.prod(out_f), math.prod(in_f))
        y = layer(x)
        torch.testing.assert_close(y, x @ w.T + layer.bias)
        torch.testing.assert_close(w, dense_from_cores(cores))
        torch.testing.assert_close(y, einsum_chain_tt(x, cores) + layer.bias)
    big = tensorly_torch_tt_linear((4, 8, 8, 4), (4, 8, 8, 4), 16)
    print("tltorch (4,8,8,4) rank 16 core shapes:", [tuple(c.shape) for c in big.weight.factors])
    print("tltorch: forward == x @ W.T + b, W == dense(cores), cores match einsum_chain_tt")
    return True


def _bench():
    torch.set_num_threads(2)
    print(f"timing: median of 20, {torch.get_num_threads()} threads, float32, no_grad")
    for factors, rank, batch in [((4, 8, 8, 4), 8, 256), ((4, 8, 8, 4), 16, 256), ((8, 8, 8, 8), 16, 64)]:
        layer = tensorly_torch_tt_linear(factors, factors, rank)
        cores = [c.detach() for c in layer.weight.factors]
        x = torch.randn(batch, math.prod(factors))
        with torch.no_grad():
            t_tl = _median_ms(lambda layer=layer, x=x: layer(x))
            t_ch = _median_ms(lambda x=x, cores=cores: einsum_chain_tt(x, cores))
        print(f"  {factors} rank {rank:2d} batch {batch:3d}: tltorch {t_tl:8.3f} ms   einsum_chain_tt {t_ch:8.3f} ms")


if __name__ == "__main__":
    _check_einsum_chain()
    if _check_tltorch():
        _bench()
