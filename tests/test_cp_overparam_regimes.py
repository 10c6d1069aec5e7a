"""Lazy (NTK) vs rich over-parameterized symmetric CP (Wang, Wu, Lee, Ma & Ge 2020): gradients and
the tangent-space fit against float64 autograd/lstsq references, recovery, laziness, bad input."""

import math

import pytest
import torch

from _util import rel_err
from tensorpress.decompose.cp_regimes import (
    _ntk_top_eigenvalue,
    lazy_gd,
    rich_gd,
    symmetric_cp_tensor,
    tangent_residual,
)

F64 = torch.float64


def planted(d, r, seed, order=3):
    gen = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(d, r, generator=gen, dtype=F64))[0]
    return symmetric_cp_tensor(torch.ones(r, dtype=F64), u, order), u


def test_symmetric_cp_tensor_matches_outer_products():
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(4, 3, generator=gen, dtype=F64)
    c = torch.tensor([1.5, -0.5, 2.0], dtype=F64)
    ref = sum(c[i] * torch.einsum("a,b,c->abc", u[:, i], u[:, i], u[:, i]) for i in range(3))
    assert rel_err(symmetric_cp_tensor(c, u, 3), ref) < 1e-14
    ref4 = sum(c[i] * torch.einsum("a,b,c,e->abce", *([u[:, i]] * 4)) for i in range(3))
    assert rel_err(symmetric_cp_tensor(c, u, 4), ref4) < 1e-14


@pytest.mark.parametrize("order", [3, 4])
def test_rich_gd_step_is_the_gradient_of_the_regularized_objective(order):
    t, _ = planted(5, 2, seed=1, order=order)
    m, scale, lam, lr = 4, 0.3, 0.07, 0.05
    res = rich_gd(t, m, init_scale=scale, reg=lam, lr=lr, epoch_steps=1, n_epochs=1, reinit_below=0.0, random_state=3)
    # the same start, then one float64 autograd step on 1/2||T(W) - T/||T|| ||^2 + lam/2 ||W||^2
    g = torch.randn(1, 5, m, generator=torch.Generator().manual_seed(3), dtype=F64)[0]
    w = (g * (scale / g.norm(dim=0))).requires_grad_(True)
    tn = t / t.norm()
    model = symmetric_cp_tensor(w.norm(dim=0) ** 2, w / w.norm(dim=0), order)
    f = 0.5 * (model - tn).pow(2).sum() + 0.5 * lam * w.pow(2).sum()
    (grad,) = torch.autograd.grad(f, w)
    w1 = (w - lr * grad).detach()
    assert rel_err(res.weights, w1.norm(dim=0) ** 2 * t.norm()) < 1e-12
    assert rel_err(res.directions, w1 / w1.norm(dim=0)) < 1e-12
    assert res.n_steps == [1]


def test_lazy_gd_step_follows_the_gradient_with_the_ntk_step_size():
    t, _ = planted(4, 2, seed=2)
    m, alpha = 3, 50.0
    res = lazy_gd(t, m, alpha=alpha, n_steps=1, tol=0.0, check_every=1, random_state=5)
    w0 = torch.randn(1, 4, m, generator=torch.Generator().manual_seed(5), dtype=F64)[0] / 2.0
    c = alpha / math.sqrt(m)

    def h(w):
        return c * symmetric_cp_tensor(torch.ones(m, dtype=F64), w, 3)

    w = w0.clone().requires_grad_(True)
    f = 0.5 * (h(w) - h(w0) - t).pow(2).sum()
    (grad,) = torch.autograd.grad(f, w)
    jac = torch.autograd.functional.jacobian(lambda x: h(x) / c, w0).reshape(64, -1)
    top = torch.linalg.eigvalsh(jac.T @ jac).max()
    w1 = res.directions[:, :m]
    assert rel_err(res.directions[:, m:], w0) < 1e-15
    step = w0 - w1
    assert torch.nn.functional.cosine_similarity(step.flatten(), grad.flatten(), dim=0) > 1 - 1e-12
    # the step size is 1 / (c^2 L), L = top eigenvalue of J^T J (power iteration: within its 2% margin)
    ratio = (step.norm() / grad.norm()) * c**2 * top
    assert 1 / 1.03 < ratio.item() <= 1.0


def test_ntk_top_eigenvalue_against_the_explicit_jacobian():
    w = torch.randn(1, 5, 6, generator=torch.Generator().manual_seed(0), dtype=F64)
    jac = torch.autograd.functional.jacobian(
        lambda x: symmetric_cp_tensor(torch.ones(6, dtype=F64), x, 3), w[0]
    ).reshape(125, -1)
    top = torch.linalg.eigvalsh(jac.T @ jac).max().item()
    est = _ntk_top_eigenvalue(w, 3, 100, torch.Generator().manual_seed(1)).item() / 1.02
    assert est == pytest.approx(top, rel=1e-6)


def test_tangent_residual_matches_an_explicit_least_squares_fit():
    t, _ = planted(4, 2, seed=3)
    for m in (1, 2, 6):
        w0 = torch.randn(1, 4, m, generator=torch.Generator().manual_seed(11), dtype=F64)[0] / 2.0
        jac = torch.autograd.functional.jacobian(
            lambda x, m=m: symmetric_cp_tensor(torch.ones(m, dtype=F64), x, 3), w0
        ).reshape(64, -1)
        sol = torch.linalg.lstsq(jac, t.reshape(-1, 1), driver="gelsd").solution
        ref = rel_err(jac @ sol, t.reshape(-1, 1))
        assert tangent_residual(t, m, random_state=11) == pytest.approx(ref, abs=1e-10)
    # the tangent space of 6 components (24 >= C(6, 3) = 20 symmetric dimensions) holds every target
    assert tangent_residual(t, 6, random_state=11) < 1e-10


def test_rich_gd_recovers_a_planted_orthogonal_tensor_without_polish():
    t, u = planted(8, 2, seed=4)
    t_copy = t.clone()
    res = rich_gd(t, 6, tol=1e-3, random_state=0)
    assert torch.equal(t, t_copy)  # caller's data untouched
    assert res.converged == [True] and res.rel_error[0] <= 1e-3
    assert rel_err(res.to_tensor(), t) == pytest.approx(res.rel_error[0], rel=1e-9)
    # each true direction is carried by the components aligned with it (descent may split it over
    # several), with its weight 1; the other components are left small
    cos = u.T @ res.directions  # (r, m)
    for j in range(2):
        aligned = cos[j] > 0.99
        assert res.weights[aligned].sum().item() == pytest.approx(1.0, rel=2e-2)
    rest = (cos.abs() <= 0.99).all(dim=0)
    assert res.weights[rest].sum().item() < 0.05
    assert res.rel_movement[0] > 10  # far from the small start: the rich regime


def test_lazy_gd_stays_near_its_start_and_fits_above_the_tangent_threshold():
    t, _ = planted(6, 2, seed=5)
    # 60 components: tangent dimension 360 >> 56 symmetric dimensions
    res = lazy_gd(t, 60, alpha=1e3, tol=1e-3, random_state=1)
    assert res.converged == [True]
    # to_tensor() cancels two sums of size ~alpha: accurate to ~1e-8 here, not to the last bit
    assert rel_err(res.to_tensor(), t) == pytest.approx(res.rel_error[0], abs=1e-7)
    assert res.rel_movement[0] < 5e-3
    loose = lazy_gd(t, 60, alpha=1e2, tol=1e-3, random_state=1)
    assert 7 < loose.rel_movement[0] / res.rel_movement[0] < 13  # movement ~ 1/alpha


def test_below_the_tangent_threshold_lazy_fails_where_rich_succeeds():
    t, _ = planted(6, 2, seed=6)
    m = 3  # 18 tangent dimensions < 56 symmetric ones
    lazy = lazy_gd(t, m, alpha=1e3, n_steps=300, tol=1e-3, random_state=2)
    floor = tangent_residual(t, m, random_state=2)
    assert floor > 0.3
    assert lazy.rel_error[0] >= floor - 1e-3  # cannot beat the linearized optimum by more than O(1/alpha)
    assert lazy.rel_error[0] < floor * 1.2  # and gets close to it
    rich = rich_gd(t, m, tol=1e-2, random_state=2)
    assert rich.converged == [True] and rich.rel_error[0] <= 1e-2


def test_batched_runs_equal_unbatched_runs_for_one_instance():
    t, _ = planted(5, 2, seed=7)
    a = rich_gd(t[None], 4, batched=True, n_epochs=2, random_state=9)
    b = rich_gd(t, 4, n_epochs=2, random_state=9)
    assert a.weights.shape == (1, 4) and b.weights.shape == (4,)
    assert torch.equal(a.weights[0], b.weights) and a.rel_error == b.rel_error
    z = lazy_gd(torch.zeros(2, 4, 4, 4, dtype=F64), 3, batched=True, random_state=0)
    assert z.rel_error == [0.0, 0.0] and z.n_steps == [0, 0]


def test_bad_arguments_raise_before_any_work():
    t, _ = planted(4, 2, seed=8)
    with pytest.raises(ValueError, match="target: expected a symmetric"):
        rich_gd(torch.randn(4, 4, 4, dtype=F64), 3)
    with pytest.raises(ValueError, match="target: expected a cubical tensor of order >= 3"):
        lazy_gd(torch.eye(4, dtype=F64), 3)
    with pytest.raises(ValueError, match="target: expected a cubical"):
        rich_gd(torch.zeros(4, 4, 5, dtype=F64), 3)
    with pytest.raises(TypeError, match="target: expected a floating-point"):
        rich_gd(torch.zeros(4, 4, 4, dtype=torch.int64), 3)
    with pytest.raises(ValueError, match="target: expected finite"):
        lazy_gd(torch.full((4, 4, 4), float("nan"), dtype=F64), 3)
    with pytest.raises(ValueError, match="width: expected an int >= 1"):
        rich_gd(t, 0)
    with pytest.raises(ValueError, match="alpha: expected a finite float > 0"):
        lazy_gd(t, 3, alpha=0.0)
    with pytest.raises(ValueError, match="lr_scale: expected a finite float > 0 and <= 2"):
        lazy_gd(t, 3, lr_scale=3.0)
    with pytest.raises(ValueError, match="init_scale"):
        rich_gd(t, 3, init_scale=-1.0)
    with pytest.raises(ValueError, match="reg: expected"):
        rich_gd(t, 3, reg=float("inf"))
    with pytest.raises(TypeError, match="random_state"):
        rich_gd(t, 3, random_state=True)
    with pytest.raises(TypeError, match="random_state: expected an int seed"):
        tangent_residual(t, 3)
    with pytest.raises(ValueError, match="order: expected an int >= 2"):
        symmetric_cp_tensor(torch.ones(2, dtype=F64), torch.ones(3, 2, dtype=F64), 1)
