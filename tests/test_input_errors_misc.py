"""Clear errors where inputs used to fail obscurely or silently: empty matrices to
truncated_svd, 0-sized modes to the TT decompositions, low-rank candidates past min(p, q) in
select_rank; and the packaging of the core features' dependencies."""

import re
from pathlib import Path

import pytest
import tomllib
import torch

from tensorpress.decompose.tt import tt_matrix_svd, tt_round, tt_svd
from tensorpress.linalg import truncated_svd
from tensorpress.rank.select import select_rank

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ truncated_svd, empty input
@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (0, 0), (3, 0, 500), (2, 400, 0)])
@pytest.mark.parametrize("method", ["auto", "jacobi", "lapack", "randomized", "randomized_checked"])
def test_truncated_svd_refuses_matrices_without_rows_or_columns(shape, method):
    with pytest.raises(
        ValueError,
        match=r"^A: expected matrices with m >= 1 rows and n >= 1 columns, got shape " + re.escape(str(shape)),
    ):
        truncated_svd(torch.zeros(shape), rank=2, method=method)


@pytest.mark.parametrize("method", ["auto", "jacobi", "lapack", "randomized", "randomized_checked"])
def test_truncated_svd_empty_batch_gives_empty_results(method):
    # no matrices at all is fine: the documented result is the empty batch of each factor
    U, S, Vh = truncated_svd(torch.zeros(0, 300, 200, dtype=torch.float64), rank=10, method=method)
    assert U.shape == (0, 300, 10) and S.shape == (0, 10) and Vh.shape == (0, 10, 200)


# ------------------------------------------------------------------ TT decompositions
@pytest.mark.parametrize("shape", [(0,), (0, 3), (3, 0, 2), (2, 3, 0)])
def test_tt_svd_refuses_a_zero_sized_mode(shape):
    with pytest.raises(ValueError, match=r"^tensor: expected every dimension >= 1, got shape " + re.escape(str(shape))):
        tt_svd(torch.zeros(shape), max_rank=2)


@pytest.mark.parametrize(
    "weight, out_f, in_f, pattern",
    [
        (torch.zeros(0, 4), [0], [4], r"^weight: expected both sides >= 1, got shape \(0, 4\)"),
        (torch.zeros(4, 0), [4], [0], r"^weight: expected both sides >= 1"),
        (
            torch.zeros(4, 4),
            [2, 2, 1, 0],
            [4, 1, 1, 1],
            r"^out_factors: expected a non-empty sequence of ints >= 1, got",
        ),
        (torch.zeros(4, 4), [-2, -2], [2, 2], r"^out_factors: expected a non-empty sequence of ints >= 1"),
        (torch.zeros(4, 4), [4], [], r"^in_factors: expected a non-empty sequence of ints >= 1, got \[\]"),
        (torch.zeros(4, 4), [4], [2.0, 2.0], r"^in_factors: expected a non-empty sequence of ints >= 1"),
    ],
)
def test_tt_matrix_svd_refuses_empty_weights_and_bad_factors(weight, out_f, in_f, pattern):
    with pytest.raises(ValueError, match=pattern):
        tt_matrix_svd(weight, out_f, in_f, max_rank=2)


def test_tt_matrix_svd_still_takes_tuples_and_numpy_ints():
    import numpy as np

    w = torch.randn(6, 8, dtype=torch.float64)
    res = tt_matrix_svd(w, (2, 3), [np.int64(2), np.int64(4)], max_rank=8)
    assert [tuple(c.shape[1:3]) for c in res.cores] == [(2, 2), (3, 4)]
    assert res.rel_error < 1e-12


def test_tt_round_refuses_an_empty_core():
    cores = [torch.zeros(1, 2, 3), torch.zeros(3, 0, 1)]
    with pytest.raises(ValueError, match=r"^cores\[1\]: expected every size >= 1, got shape \(3, 0, 1\)"):
        tt_round(cores, max_rank=2)


# ------------------------------------------------------------------ select_rank
@pytest.mark.parametrize("family", ["lowrank", "matrix"])
def test_select_rank_refuses_a_low_rank_candidate_past_min_p_q(family):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(60, 4, 3, generator=g, dtype=torch.float64)
    y = torch.randn(60, generator=g, dtype=torch.float64)
    with pytest.raises(
        ValueError,
        match=r"^candidates: a low-rank candidate must be at most min\(p, q\) = 3 for "
        r"samples of shape \(4, 3\), got 5",
    ):
        select_rank(family, X, y, [1, 2, 5], random_state=0)
    res = select_rank(family, X, y, [1, 3], random_state=0)  # min(p, q) itself is a model
    assert res.candidates == [1, 3]


# ------------------------------------------------------------------ packaging
def test_core_features_dependencies_are_core_dependencies():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[<>=!~ \[]", d, maxsplit=1)[0].lower() for d in project["dependencies"]}
    assert {"safetensors", "tqdm"} <= names  # save_compressed / load_compressed, progress=True


def test_setup_script_installs_the_core_dependencies_before_its_no_deps_build():
    lines = (ROOT / "scripts" / "setup.sh").read_text().splitlines()
    build = next(i for i, line in enumerate(lines) if "--no-build-isolation --no-deps ." in line)
    unconditional = [line for line in lines[:build] if line.startswith("python -m pip install")]
    for dep in ("safetensors", "tqdm"):
        assert any(dep in line for line in unconditional), f"scripts/setup.sh: {dep} is not installed for every extra"
