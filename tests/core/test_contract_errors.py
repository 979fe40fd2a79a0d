"""Observation 8 of issue 13: errors that fit the cause.

Malformed input is a ``ValueError`` naming the argument (at the call), a bad setting is a
``ValueError`` naming the parameter (at construction), a failed solve is a library error whose
advice fits its cause. Items owned by the solvers' branch (i16) are marked ``xfail``.
"""

import cvxpy as cp
import pytest
import torch

import implicit_layers as il
from implicit_layers import functional as F
from tests.layers.qp_fixtures import one_thread  # noqa: F401 (autouse fixture)

DT = torch.float64
NAN, INF = float("nan"), float("inf")


def _cvxpy_layer():
    x = cp.Variable(2)
    p, q = cp.Parameter(2, name="p"), cp.Parameter(2, name="q")
    problem = cp.Problem(cp.Minimize(cp.sum_squares(x - p) + q @ x), [x >= 0])
    return il.QPLayer.from_cvxpy(problem, parameters=[p, q], variables=[x])


def _eye(*batch, n=2, dtype=DT):
    return torch.eye(n, dtype=dtype).expand(*batch, n, n).clone()


# --- batch dims that do not broadcast ----------------------------------------------------

BROADCAST = {
    "QPLayer": lambda: il.QPLayer()(_eye(3), torch.ones(4, 2, dtype=DT)),
    "QPLayer-constraints": lambda: il.QPLayer()(_eye(3), torch.ones(3, 2, dtype=DT), None, None,
                                               torch.ones(4, 1, 2, dtype=DT),
                                               torch.ones(4, 1, dtype=DT)),
    "from_cvxpy": lambda: _cvxpy_layer()(torch.ones(3, 2, dtype=DT), torch.ones(4, 2, dtype=DT)),
    "EqualityQPLayer": lambda: F.eq_qp(_eye(3), torch.ones(4, 2, dtype=DT),
                                       torch.ones(1, 2, dtype=DT), torch.ones(1, dtype=DT)),
    "LyapunovLayer": lambda: F.lyapunov(-_eye(2), _eye(4)),
    "SylvesterLayer": lambda: F.sylvester(_eye(2), _eye(3), torch.ones(2, 2, dtype=DT)),
}


@pytest.mark.parametrize("call", BROADCAST.values(), ids=BROADCAST.keys())
def test_non_broadcasting_batch_dims_are_a_value_error(call):
    with pytest.raises(ValueError, match="broadcast"):
        call()


def test_lyapunov_batch_mismatch_names_a_and_q():
    with pytest.raises(ValueError, match=r"A \(2,\), Q \(4,\)"):
        F.lyapunov(-_eye(2), _eye(4))


def test_cvxpy_parameter_with_nan_is_named():
    with pytest.raises(ValueError, match=r"^parameter p \(argument 0\) contains NaN"):
        _cvxpy_layer()(torch.tensor([NAN, 1.0], dtype=DT), torch.ones(2, dtype=DT))
    with pytest.raises(ValueError, match=r"^parameter q \(argument 1\) contains inf"):
        _cvxpy_layer()(torch.ones(2, dtype=DT), torch.tensor([INF, 1.0], dtype=DT))


# --- half precision ---------------------------------------------------------------------

def _entries(dtype):
    one = lambda *s: torch.ones(*s, dtype=dtype)  # noqa: E731
    return {
        "root_find": lambda: F.root_find(lambda x, y: y - x, one(2), one(2)),
        "fixed_point": lambda: F.fixed_point(lambda x, z: 0.5 * z + x, one(2), one(2)),
        "argmin": lambda: F.argmin(lambda x, y: ((y - x) ** 2).sum(-1), one(2), one(2)),
        "least_squares": lambda: F.least_squares(lambda x, y: y - x, one(2), one(2)),
        "eq_qp": lambda: F.eq_qp(_eye(dtype=dtype), one(2), one(1, 2), one(1)),
        "qp": lambda: F.qp(_eye(dtype=dtype), one(2), G=one(1, 2), h=one(1)),
        "lyapunov": lambda: F.lyapunov(-_eye(dtype=dtype), _eye(dtype=dtype)),
        "discrete_lyapunov": lambda: F.discrete_lyapunov(0.5 * _eye(dtype=dtype), _eye(dtype=dtype)),
        "sylvester": lambda: F.sylvester(_eye(dtype=dtype), _eye(dtype=dtype), _eye(dtype=dtype)),
        "smoothed_lp": lambda: F.smoothed_lp(one(2), G=-_eye(dtype=dtype), h=one(2)),
        "perturbed_lp": lambda: F.perturbed_lp(one(2), G=-_eye(dtype=dtype), h=one(2)),
        "from_cvxpy": lambda: _cvxpy_layer()(one(2), one(2)),
    }


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("entry", sorted(_entries(DT)))
def test_half_precision_is_rejected_by_name(entry, dtype):
    with pytest.raises(ValueError, match="float32 or float64"):
        _entries(dtype)[entry]()


# --- settings validated at construction ---------------------------------------------------

ROOT_SOLVERS = [il.Newton, il.Broyden, il.Picard, il.Anderson, il.ScipyRoot, il.LBFGS,
                il.NewtonCG, il.ScipyMinimize, il.GaussNewton, il.LevenbergMarquardt]


@pytest.mark.parametrize("setting", [dict(tol=-1.0), dict(tol=NAN), dict(rtol=-1.0),
                                     dict(max_iter=-1)], ids=str)
@pytest.mark.parametrize("solver", ROOT_SOLVERS, ids=lambda s: s.__name__)
def test_iterative_solver_settings_are_validated(solver, setting):
    with pytest.raises(ValueError, match=next(iter(setting))):
        solver(**setting)


def test_functional_budget_is_validated():
    with pytest.raises(ValueError, match="tol"):
        F.root_find(lambda x, y: y - x, torch.ones(2, dtype=DT), torch.ones(2, dtype=DT), tol=-1.0)


BAD_SETTINGS = {
    "InteriorPoint(reg=-1)": lambda: il.InteriorPoint(reg=-1),
    "InteriorPoint(tol=nan)": lambda: il.InteriorPoint(tol=NAN),
    "InteriorPoint(max_iter=0)": lambda: il.InteriorPoint(max_iter=0),
    "OSQP(eps_abs=-1)": lambda: il.OSQP(eps_abs=-1),
    "OSQP(eps_rel=nan)": lambda: il.OSQP(eps_rel=NAN),
    "OSQP(max_iter=0)": lambda: il.OSQP(max_iter=0),
    "OSQP(tol=-1)": lambda: il.OSQP(tol=-1),
    "OSQP(rho=-1)": lambda: il.OSQP(rho=-1),
    "OSQP(active_tol=-1)": lambda: il.OSQP(active_tol=-1),  # no such setting
    "GMRES(rtol=-1)": lambda: il.GMRES(rtol=-1),
    "GMRES(restart=0)": lambda: il.GMRES(restart=0),
    "CG(atol=nan)": lambda: il.CG(atol=NAN),
    "BiCGStab(max_iter=0)": lambda: il.BiCGStab(max_iter=0),
    "LU(rcond=-1)": lambda: il.LU(rcond=-1),
    "Cholesky(rcond=nan)": lambda: il.Cholesky(rcond=NAN),
    "HessianAdjoint(rtol=-1)": lambda: il.HessianAdjoint(rtol=-1),
    "HessianAdjoint(max_iter=0)": lambda: il.HessianAdjoint(max_iter=0),
    "LeastSquaresAdjoint(rtol=inf)": lambda: il.LeastSquaresAdjoint(rtol=INF),
    "DirectAdjoint(GMRES)": lambda: il.DirectAdjoint(il.GMRES()),
    "DirectAdjoint('lu')": lambda: il.DirectAdjoint("lu"),
    "KrylovAdjoint('gmres')": lambda: il.KrylovAdjoint("gmres"),
    "FixedPointAdjoint('picard')": lambda: il.FixedPointAdjoint("picard"),
    "RootFindLayer(solver='newton')": lambda: il.RootFindLayer(lambda x, y: y, solver="newton"),
    "ImplicitLayer(adjoint='direct')": lambda: il.ImplicitLayer(lambda x, y: y, il.Newton(),
                                                                adjoint="direct"),
    "ImplicitLayer(event_ndim=-1)": lambda: il.ImplicitLayer(lambda x, y: y, il.Newton(),
                                                             event_ndim=-1),
    "LyapunovLayer(rcond=-1)": lambda: il.LyapunovLayer(rcond=-1),
    "SylvesterLayer(eig_max_cond=0)": lambda: il.SylvesterLayer(eig_max_cond=0),
    "SmoothedLP(gamma=0)": lambda: il.SmoothedLP(0.0),
    "PerturbedLP(sigma=nan)": lambda: il.PerturbedLP(NAN),
    "QPLayer(solver=Newton)": lambda: il.QPLayer(solver=il.Newton()),
}


@pytest.mark.parametrize("make", BAD_SETTINGS.values(), ids=BAD_SETTINGS.keys())
def test_bad_settings_are_a_value_error_at_construction(make):
    with pytest.raises(ValueError):
        make()


# --- the initial guess of a fixed point is z0 -----------------------------------------------

BAD_Z0 = {
    "nan": torch.full((2, 3), NAN, dtype=DT),
    "integer": torch.ones(2, 3, dtype=torch.int64),
    "half": torch.ones(2, 3, dtype=torch.float16),
    "0-d": torch.tensor(1.0, dtype=DT),
    "list": [[0.0] * 3] * 2,
}


@pytest.mark.parametrize("z0", BAD_Z0.values(), ids=BAD_Z0.keys())
def test_bad_z0_is_reported_as_z0(z0):
    x = torch.ones(2, 3, dtype=DT)
    for call in (lambda: il.DEQLayer(lambda x, z: 0.5 * z + x)(x, z0),
                 lambda: F.fixed_point(lambda x, z: 0.5 * z + x, x, z0)):
        with pytest.raises(ValueError, match="z0") as info:
            call()
        assert "y0" not in str(info.value)


def test_deq_cell_of_the_wrong_shape_is_a_value_error():
    with pytest.raises(ValueError, match="shape"):
        il.DEQLayer(lambda x, z: torch.cat([z, z], -1))(torch.ones(2, 3, dtype=DT))


def test_deq_warns_only_off_equilibrium():
    """z = θ·z has the converged fixed point z = 0: no 'not an equilibrium' warning."""
    import warnings

    theta = torch.tensor([0.05, 0.2], dtype=DT, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", il.ConvergenceWarning)
        z = il.DEQLayer(lambda t, z: t * z)(theta, torch.ones(2, dtype=DT))
    assert torch.allclose(z, torch.zeros(2, dtype=DT), atol=1e-10)


# --- failed QPs: advice that fits the cause --------------------------------------------------

I2 = torch.eye(2, dtype=DT)
ONES = torch.ones(2, dtype=DT)
INFEASIBLE = {
    "inequalities": dict(G=torch.tensor([[1.0, 0], [-1, 0]], dtype=DT),
                         h=torch.tensor([-1.0, -1.0], dtype=DT)),
    "equalities": dict(A=torch.tensor([[1.0, 0], [1, 0]], dtype=DT),
                       b=torch.tensor([1.0, 2.0], dtype=DT)),
    "both": dict(A=torch.ones(1, 2, dtype=DT), b=torch.tensor([5.0], dtype=DT), G=I2, h=ONES),
}


@pytest.mark.parametrize("solver", [il.InteriorPoint, il.OSQP], ids=lambda s: s.__name__)
@pytest.mark.parametrize("data", INFEASIBLE.values(), ids=INFEASIBLE.keys())
def test_infeasible_qp_says_infeasible_without_budget_advice(data, solver):
    with pytest.raises(il.ConvergenceError, match="infeasible") as info:
        F.qp(I2, ONES, solver=solver(), **data)
    assert "max_iter" not in str(info.value) and "loosen tol" not in str(info.value)


def test_indefinite_qp_names_positive_semidefiniteness():
    Q = torch.diag(torch.tensor([1.0, -1.0], dtype=DT))
    G, h = torch.cat([I2, -I2]), torch.ones(4, dtype=DT)
    with pytest.raises(il.ConvergenceError, match="positive semidefinite") as info:
        F.qp(Q, ONES, G=G, h=h)
    assert "max_iter" not in str(info.value) and "loosen tol" not in str(info.value)
    with pytest.raises(ValueError, match="positive semidefinite"):
        F.qp(Q, ONES, G=G, h=h, solver=il.OSQP())


def test_equality_only_qp_is_solved():
    """No inequality rows at all (the interior point's start raised IndexError)."""
    A, b = torch.ones(1, 2, dtype=DT), torch.ones(1, dtype=DT)
    x, lam, mu = F.qp(I2, ONES, A, b)
    torch.testing.assert_close(x, torch.full((2,), 0.5, dtype=DT))
    torch.testing.assert_close(I2 @ x + ONES + A.T @ lam, torch.zeros(2, dtype=DT))
    assert mu.shape == (0,)
    torch.testing.assert_close(F.qp(I2, ONES)[0], -ONES)
