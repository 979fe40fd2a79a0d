"""Every documented error of the core is triggered here."""

import pytest
import torch

import implicit_layers as il
from implicit_layers import functional as F
from tests.core import problems

DT = torch.float64


def test_non_convergence_raises_with_stats():
    residual, x, y0, _ = problems.cube_root()
    with pytest.raises(il.ConvergenceError, match="did not converge") as info:
        F.root_find(residual, x, y0, max_iter=1, event_ndim=0)
    assert info.value.stats is not None and not info.value.stats.all_converged


def test_non_convergence_warns_under_warn_policy():
    residual, x, y0, _ = problems.cube_root()
    with pytest.warns(il.ConvergenceWarning, match="did not converge"):
        y = F.root_find(residual, x, y0, max_iter=1, event_ndim=0, on_failure="warn")
    assert torch.isfinite(y).all()


def test_adjoint_non_convergence_raises():
    residual, (A, b), y0, _ = problems.linear_system(n=6)
    b.requires_grad_()
    y = F.root_find(residual, (A, b), y0, adjoint=il.KrylovAdjoint(il.GMRES(max_iter=1)))
    with pytest.raises(il.ConvergenceError, match="adjoint solve"):
        y.sum().backward()


def test_unknown_failure_policy_is_rejected():
    with pytest.raises(ValueError, match="on_failure"):
        il.RootFindLayer(lambda x, y: y - x, on_failure="ignore")


def test_singular_jacobian_raises():
    # f(x, y) = y² − x has a singular Jacobian at the root y = 0 of x = 0
    residual = lambda x, y: torch.stack([y[..., 0] ** 2 - x[..., 0], y[..., 1] - x[..., 1]], -1)  # noqa: E731
    x = torch.tensor([0.0, 1.0], dtype=DT, requires_grad=True)
    with pytest.raises((il.SingularSystemError, il.ConvergenceError)):
        y = F.root_find(residual, x, torch.tensor([0.0, 1.0], dtype=DT))
        y.sum().backward()


def test_singular_jacobian_at_solution_raises_in_backward():
    A = torch.tensor([[1.0, 2.0], [2.0, 4.0]], dtype=DT)  # rank 1
    b = torch.tensor([1.0, 2.0], dtype=DT, requires_grad=True)
    y0 = torch.tensor([1.0, 0.0], dtype=DT)  # already a solution: no forward iteration
    y = F.root_find(lambda b, y: A @ y - b, b, y0, solver=il.Broyden(init="identity"))
    with pytest.raises(il.SingularSystemError, match="singular"):
        y.sum().backward()


def test_singular_newton_jacobian_raises():
    x = torch.tensor([1.0], dtype=DT)
    with pytest.raises(il.SingularSystemError, match="Newton Jacobian"):
        F.root_find(lambda x, y: y**2 + x, x, torch.zeros(1, dtype=DT))


def test_nan_input_is_rejected_by_name():
    residual, (A, b), y0, _ = problems.linear_system()
    b[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"x\[1\] contains NaN"):
        F.root_find(residual, (A, b), y0)
    with pytest.raises(ValueError, match="y0 contains NaN"):
        F.root_find(residual, (A, b.nan_to_num()), torch.full_like(y0, float("inf")))


def test_integer_input_is_rejected():
    with pytest.raises(ValueError, match="x must have a floating dtype"):
        F.root_find(lambda x, y: y - x, torch.ones(3, dtype=torch.int64), torch.zeros(3, dtype=DT))


def test_dtype_mismatch_is_rejected():
    with pytest.raises(ValueError, match="dtype"):
        F.root_find(lambda x, y: y - x, torch.ones(3, dtype=torch.float32), torch.zeros(3, dtype=DT))


def test_residual_with_wrong_shape_is_rejected():
    with pytest.raises(ValueError, match="residual returned shape"):
        F.root_find(lambda x, y: y.sum(-1) - x.sum(-1), torch.ones(2, 3, dtype=DT),
                    torch.zeros(2, 3, dtype=DT), solver=il.Broyden())


def test_missing_initial_guess_is_rejected():
    layer = il.RootFindLayer(lambda x, y: y - x)
    with pytest.raises(ValueError, match="y0 is required"):
        layer(torch.ones(3, dtype=DT))


def test_nan_iterate_stops_the_solve():
    # the residual becomes NaN away from the start: the solve must stop with a clear error
    residual = lambda x, y: torch.log(y) - x  # noqa: E731  (the first step lands at y < 0)
    with pytest.raises(il.ConvergenceError, match="non-finite"):
        F.root_find(residual, torch.tensor([5.0], dtype=DT), torch.ones(1, dtype=DT),
                    solver=il.Broyden(init="identity"))
