"""truncated_svd against float64 LAPACK on matrices with chosen spectra."""

import pytest
import torch

from tensorpress.linalg import cholesky_qr2, svd_method, truncated_svd


def with_spectrum(batch, m, n, spectrum, dtype=torch.float64, seed=0):
    """Random orthogonal factors around a given singular-value profile."""
    gen = torch.Generator().manual_seed(seed)
    k = min(m, n)
    qu, _ = torch.linalg.qr(torch.randn(batch, m, k, generator=gen, dtype=torch.float64))
    qv, _ = torch.linalg.qr(torch.randn(batch, n, k, generator=gen, dtype=torch.float64))
    if spectrum == "flat":
        s = torch.ones(k, dtype=torch.float64)
    elif spectrum == "decaying":
        s = torch.tensor([0.8**i for i in range(k)], dtype=torch.float64)
    elif spectrum == "clustered":
        s = torch.tensor([1.0 + 1e-6 * (i % 3) if i < k // 2 else 1e-2 for i in range(k)], dtype=torch.float64)
    elif spectrum == "rank_deficient":
        s = torch.tensor([1.0 / (i + 1) if i < max(1, k // 3) else 0.0 for i in range(k)], dtype=torch.float64)
    elif spectrum == "ill_conditioned":
        s = torch.logspace(0, -6, k, dtype=torch.float64)
    else:
        raise ValueError(spectrum)
    return ((qu * s) @ qv.transpose(-1, -2)).to(dtype)


def orthogonality(Q, dim):
    Q = Q.double()
    gram = Q.transpose(-1, -2) @ Q if dim == "columns" else Q @ Q.transpose(-1, -2)
    eye = torch.eye(gram.shape[-1], dtype=torch.float64)
    return (gram - eye).abs().max().item() if gram.numel() else 0.0


SPECTRA = ["flat", "decaying", "clustered", "rank_deficient", "ill_conditioned"]


@pytest.mark.parametrize("spectrum", SPECTRA)
@pytest.mark.parametrize("shape", [(7, 16, 16), (3, 32, 20), (3, 20, 32), (2, 64, 64), (2, 1, 9)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_jacobi_matches_lapack(spectrum, shape, dtype):
    A = with_spectrum(*shape, spectrum, dtype=dtype)
    U, S, Vh = truncated_svd(A, rank=min(shape[1:]), method="jacobi")
    reference = torch.linalg.svdvals(A.double())
    tol = 1e-5 if dtype == torch.float32 else 1e-11
    # relative per singular value; exact zeros can only come out at the noise level of the
    # largest one (the Jacobi sweeps run in float64 whatever the input dtype)
    noise = reference[..., :1] * 1e-14
    assert ((S.double() - reference).abs() <= tol * reference + noise).all()
    assert orthogonality(U, "columns") <= tol
    assert orthogonality(Vh, "rows") <= tol
    rebuilt = U.double() @ torch.diag_embed(S.double()) @ Vh.double()
    assert (rebuilt - A.double()).norm() <= tol * max(A.double().norm(), 1e-30)
    # deterministic signs: the largest-magnitude entry of each left vector is positive
    idx = U.abs().argmax(dim=-2, keepdim=True)
    assert (torch.gather(U, -2, idx) > 0).all()
    assert (S[..., :-1] >= S[..., 1:]).all()


def test_zero_matrix_gives_zero_values_and_orthonormal_vectors():
    U, S, Vh = truncated_svd(torch.zeros(3, 8, 5), rank=5, method="jacobi")
    assert torch.equal(S, torch.zeros(3, 5))
    assert orthogonality(U, "columns") <= 1e-6 and orthogonality(Vh, "rows") <= 1e-6


@pytest.mark.parametrize("spectrum", SPECTRA)
def test_randomized_within_one_percent_of_optimal(spectrum):
    A = with_spectrum(2, 400, 300, spectrum, dtype=torch.float64, seed=1)
    rank = 20
    gen = torch.Generator().manual_seed(0)
    U, S, Vh = truncated_svd(A, rank=rank, method="randomized", generator=gen)
    s_all = torch.linalg.svdvals(A)
    optimal = s_all[..., rank:].pow(2).sum(-1).sqrt()
    err = (U @ torch.diag_embed(S) @ Vh - A).norm(dim=(-2, -1))
    assert (err <= 1.01 * optimal + 1e-12 * s_all[..., 0]).all(), (err, optimal)
    assert orthogonality(U, "columns") <= 1e-10 and orthogonality(Vh, "rows") <= 1e-10


def test_randomized_float32_on_a_layer_sized_matrix():
    gen = torch.Generator().manual_seed(0)
    A = (
        torch.randn(300, 768, generator=gen)
        @ torch.diag(torch.logspace(0, -2, 768))
        @ torch.randn(768, 768, generator=gen)
        / 30
    )
    U, S, Vh = truncated_svd(A, rank=32, method="randomized", generator=gen)
    s_all = torch.linalg.svdvals(A.double())
    optimal = s_all[32:].pow(2).sum().sqrt()
    err = (U.double() @ torch.diag(S.double()) @ Vh.double() - A.double()).norm()
    assert err <= 1.01 * optimal
    assert orthogonality(U, "columns") <= 1e-5 and orthogonality(Vh, "rows") <= 1e-5


@pytest.mark.parametrize("method", ["jacobi", "lapack", "randomized"])
def test_batch_shapes_rank_and_rtol(method):
    A = with_spectrum(6, 40, 30, "decaying", dtype=torch.float64).reshape(2, 3, 40, 30)
    U, S, Vh = truncated_svd(A, rank=10, method=method if method != "jacobi" else "jacobi")
    assert U.shape == (2, 3, 40, 10) and S.shape == (2, 3, 10) and Vh.shape == (2, 3, 10, 30)
    U2, S2, Vh2 = truncated_svd(A, rtol=0.8**5 * 1.0001, method="lapack" if method == "randomized" else method)
    assert S2.shape[-1] == 5  # 1, .8, .64, .512, .4096 are >= rtol * S_max
    ref = torch.linalg.svdvals(A)[..., :10]
    assert torch.allclose(S.double(), ref, rtol=1e-8)


def check_against_lapack(A, U, S, Vh, tol):
    """truncated_svd's full-rank outputs for A against float64 LAPACK, matrix by matrix."""
    reference = torch.linalg.svdvals(A.double())
    noise = reference[..., :1] * 1e-14  # exact zeros come out at the noise level of the largest
    assert ((S.double() - reference).abs() <= tol * reference + noise).all()
    assert orthogonality(U, "columns") <= tol
    assert orthogonality(Vh, "rows") <= tol
    rebuilt = U.double() @ torch.diag_embed(S.double()) @ Vh.double()
    error = torch.linalg.matrix_norm(rebuilt - A.double())
    assert (error <= tol * torch.linalg.matrix_norm(A.double()).clamp_min(1e-300)).all()


@pytest.mark.parametrize("shape", [(24, 24), (40, 17), (17, 40)])
def test_float32_batch_of_mixed_matrices_matches_lapack_and_single_solves(shape):
    # float32 runs 8 matrices per group in lock step: each group here mixes spectra that
    # converge at different speeds, and the last group is partly empty (19 matrices)
    A = torch.cat([with_spectrum(1, *shape, SPECTRA[i % len(SPECTRA)], dtype=torch.float32, seed=i) for i in range(19)])
    U, S, Vh = truncated_svd(A, rank=min(shape), method="jacobi")
    check_against_lapack(A, U, S, Vh, tol=1e-6)
    for i in (0, 7, 18):  # a matrix alone in its group gets the same result
        Ui, Si, Vhi = truncated_svd(A[i : i + 1], rank=min(shape), method="jacobi")
        assert torch.allclose(Si, S[i : i + 1], rtol=1e-6, atol=1e-6 * float(S[i, 0]))


@pytest.mark.parametrize("spectrum", ["decaying", "clustered", "rank_deficient"])
@pytest.mark.parametrize("shape", [(9, 63, 63), (9, 33, 64), (9, 64, 47), (9, 3, 5)])
def test_float32_odd_counts_match_lapack(shape, spectrum):
    # the float32 kernel pairs vectors two by two (quads of four vectors per fused rotation
    # pass): with an odd count one vector is left alone, and its pairs take the one-by-one path
    A = with_spectrum(*shape, spectrum, dtype=torch.float32, seed=5)
    U, S, Vh = truncated_svd(A, rank=min(shape[1:]), method="jacobi")
    check_against_lapack(A, U, S, Vh, tol=1e-6)


@pytest.mark.parametrize("spectrum", ["decaying", "flat", "ill_conditioned"])
def test_float32_many_vectors_match_lapack(spectrum):
    # past 64 vectors a float32 sweep brings the vectors back to true scale part way (its fast
    # Givens scales would otherwise leave float32's range); method="jacobi" takes any size
    A = with_spectrum(3, 150, 130, spectrum, dtype=torch.float32, seed=6)
    U, S, Vh = truncated_svd(A, rank=130, method="jacobi")
    check_against_lapack(A, U, S, Vh, tol=1e-6)


def test_float32_extreme_scales():
    # the float32 sweeps run on each matrix scaled by a power of two; the result must not
    # depend on the scale, from huge to tiny (denormal entries included)
    base = with_spectrum(6, 32, 32, "decaying", dtype=torch.float64, seed=3)
    scales = torch.tensor([1e30, 1e-30, 1.0, 1e-12, 1e20, 1.0], dtype=torch.float64)
    A = (base * scales[:, None, None]).float()
    A[5, :, 7] *= 1e-38  # one column of denormals next to normal ones
    U, S, Vh = truncated_svd(A, rank=32, method="jacobi")
    assert torch.isfinite(U).all() and torch.isfinite(S).all() and torch.isfinite(Vh).all()
    check_against_lapack(A, U, S, Vh, tol=1e-6)


def test_method_choice_is_visible():
    assert svd_method((100, 16, 16)) == "jacobi"
    assert svd_method((100, 64, 64)) == "jacobi"
    assert svd_method((100, 64, 64), dtype=torch.float64) == "lapack"
    assert svd_method((100, 32, 32), dtype=torch.float64) == "jacobi"
    assert svd_method((1024, 1024), rank=64) == "randomized_checked"
    assert svd_method((1024, 1024), rank=64, dtype=torch.float64) == "lapack"  # cost model: no gain
    assert svd_method((1024, 1024), rank=900) == "lapack"
    assert svd_method((1024, 1024), rank=64, method="lapack") == "lapack"


def test_cholesky_qr2_orthonormal_and_falls_back_on_rank_deficiency():
    gen = torch.Generator().manual_seed(0)
    Y = torch.randn(4, 200, 12, generator=gen, dtype=torch.float64)
    Y[1, :, 5] = Y[1, :, 2]  # exactly rank deficient: Cholesky QR cannot factor it
    Q, R = cholesky_qr2(Y)
    assert orthogonality(Q, "columns") <= 1e-12
    assert torch.allclose(Q @ R, Y, atol=1e-10)


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(A=torch.full((4, 4), float("nan")), rank=2), "A: expected finite"),
        (dict(A=torch.tensor([[1.0, float("inf")], [0.0, 1.0]]), rank=1), "A: expected finite"),
        (dict(A=torch.ones(4), rank=1), "A: expected shape"),
        (dict(A=torch.ones(4, 4, dtype=torch.int64), rank=1), "A: expected dtype"),
        (dict(A=torch.ones(4, 4)), "rank, rtol"),
        (dict(A=torch.ones(4, 4), rank=0), "rank: expected"),
        (dict(A=torch.ones(4, 4), rank=2.5), "rank: expected"),
        (dict(A=torch.ones(4, 4), rtol=1.5), "rtol: expected"),
        (dict(A=torch.ones(4, 4), rank=2, method="qr"), "method: expected"),
        (dict(A=torch.ones(4, 4), rtol=0.1, method="randomized"), "rank: the randomized"),
        (dict(A=torch.ones(4, 4), rank=2, n_iter=-1), "n_iter: expected"),
    ],
)
def test_bad_input(bad, message):
    A = bad["A"]
    before = A.clone()
    with pytest.raises((ValueError, TypeError), match=message):
        truncated_svd(**bad)
    assert torch.equal(A, before) or torch.isnan(A).any()


@pytest.mark.parametrize("shape", [(3, 7), (2, 5, 9), (6, 6), (9, 4)])
def test_lapack_of_wide_matrices_through_the_transpose(shape):
    """lapack_svd factors a wide matrix through its tall transpose (faster in MKL): the same
    reduced SVD, A = U diag(S) Vh with orthonormal factors and LAPACK's values."""
    from tensorpress.linalg.svd import lapack_svd

    A = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    U, S, Vh = lapack_svd(A)
    k = min(shape[-2:])
    assert U.shape == (*shape[:-1], k) and Vh.shape == (*shape[:-2], k, shape[-1])
    torch.testing.assert_close(U @ torch.diag_embed(S) @ Vh, A, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(S, torch.linalg.svdvals(A), rtol=1e-12, atol=1e-12)
    eye = torch.eye(k, dtype=torch.float64).expand(*shape[:-2], k, k)
    torch.testing.assert_close(U.mT @ U, eye, rtol=0, atol=1e-12)
    torch.testing.assert_close(Vh @ Vh.mT, eye, rtol=0, atol=1e-12)
