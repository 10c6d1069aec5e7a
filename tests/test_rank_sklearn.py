"""The rank-selection regressors follow scikit-learn's estimator conventions: clone, the
parameter round trips and the checks of sklearn.utils.estimator_checks that apply to
estimators whose samples are tensors (the fitting checks feed 2-d X, which a CP/Tucker
regressor of matrix samples rejects by design)."""

from __future__ import annotations

import pytest
import torch

from tensorpress.rank import AveragedRegressor, CPRegressor, LowRankRegressor, TuckerRegressor

sklearn = pytest.importorskip("sklearn")
from sklearn.base import clone  # noqa: E402
from sklearn.utils import estimator_checks as checks  # noqa: E402

ESTIMATORS = [
    CPRegressor(rank=2, ridge=0.1, random_state=3),
    TuckerRegressor(ranks=(2, 3), tol=1e-6),
    LowRankRegressor(rank=2, fit_intercept=True),
]


@pytest.mark.parametrize("est", ESTIMATORS, ids=lambda e: type(e).__name__)
def test_clone_and_params_round_trip(est):
    twin = clone(est)
    assert twin is not est and type(twin) is type(est)
    assert twin.get_params() == est.get_params()
    assert set(est.get_params()) == {"ridge", "n_iter_max", "tol", "init", "fit_intercept", "random_state"} | (
        {"ranks"} if isinstance(est, TuckerRegressor) else {"rank"}
    )
    twin.set_params(n_iter_max=7)
    assert twin.n_iter_max == 7 and est.n_iter_max != 7
    with pytest.raises(ValueError, match=r"^bogus: not a parameter of"):
        twin.set_params(bogus=1)
    assert repr(est).startswith(type(est).__name__ + "(")


@pytest.mark.parametrize(
    "est", [*ESTIMATORS, AveragedRegressor(family="tucker", candidates=(1, 2))], ids=lambda e: type(e).__name__
)
@pytest.mark.parametrize(
    "check",
    [
        checks.check_no_attributes_set_in_init,
        checks.check_get_params_invariance,
        checks.check_set_params,
        checks.check_parameters_default_constructible,
    ],
    ids=lambda c: c.__name__,
)
def test_sklearn_estimator_checks(est, check):
    check(type(est).__name__, est)


def test_clone_fits_the_same_model():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(120, 5, 6, generator=gen, dtype=torch.float64)
    B = torch.randn(5, 1, generator=gen, dtype=torch.float64) @ torch.randn(1, 6, generator=gen, dtype=torch.float64)
    y = (X * B).sum((1, 2)) + 0.1 * torch.randn(120, generator=gen, dtype=torch.float64)
    est = CPRegressor(rank=1, random_state=0).fit(X, y)
    twin = clone(est).fit(X, y)
    torch.testing.assert_close(twin.predict(X), est.predict(X), rtol=0, atol=0)
    assert not hasattr(clone(est), "coef_")  # clone copies parameters, not the fit
