"""Observation 8 of issue 13 (empty inputs): an empty batch (B = 0) and a zero-size unknown
(n = 0) give correctly shaped empty outputs and gradients in every layer, with every solver
and backend, and nothing is printed (LAPACK used to print on size-0 problems)."""

import cvxpy as cp
import pytest
import torch

import implicit_layers as il
from implicit_layers import functional as F
from tests.layers.qp_fixtures import one_thread  # noqa: F401 (autouse fixture)

DT = torch.float64


def _eye(B, n):
    return torch.eye(n, dtype=DT).expand(B, n, n).clone()


def _ones(*shape):
    return torch.ones(*shape, dtype=DT)


def _cubic(x, y):
    return y ** 3 + y - x


def _cvxpy_layer():
    x, p = cp.Variable(2), cp.Parameter(2)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(x - p)), [x >= 0])
    return il.QPLayer.from_cvxpy(problem, parameters=[p], variables=[x])


# name: (inputs(B, n), call(*inputs) -> tuple of outputs, expected output shapes(B, n))
ENTRIES = {
    "root_find-Newton": (lambda B, n: (_ones(B, n),),
                         lambda x: F.root_find(_cubic, x, torch.zeros_like(x)),
                         lambda B, n: [(B, n)]),
    "root_find-Broyden": (lambda B, n: (_ones(B, n),),
                          lambda x: F.root_find(_cubic, x, torch.zeros_like(x), solver=il.Broyden()),
                          lambda B, n: [(B, n)]),
    "root_find-ScipyRoot": (lambda B, n: (_ones(B, n),),
                            lambda x: F.root_find(_cubic, x, torch.zeros_like(x),
                                                  solver=il.ScipyRoot()),
                            lambda B, n: [(B, n)]),
    "root_find-event_ndim=0": (lambda B, n: (_ones(B, n),),
                               lambda x: F.root_find(_cubic, x, torch.zeros_like(x), event_ndim=0),
                               lambda B, n: [(B, n)]),
    "fixed_point-Anderson": (lambda B, n: (_ones(B, n),),
                             lambda x: F.fixed_point(lambda x, z: 0.5 * z + x, x, torch.zeros_like(x)),
                             lambda B, n: [(B, n)]),
    "fixed_point-Picard": (lambda B, n: (_ones(B, n),),
                           lambda x: F.fixed_point(lambda x, z: 0.5 * z + x, x, torch.zeros_like(x),
                                                   solver=il.Picard()),
                           lambda B, n: [(B, n)]),
    "DEQLayer": (lambda B, n: (_ones(B, n),),
                 lambda x: il.DEQLayer(lambda x, z: 0.5 * torch.tanh(z) + x)(x),
                 lambda B, n: [(B, n)]),
    "argmin-LBFGS": (lambda B, n: (_ones(B, n),),
                     lambda x: F.argmin(lambda x, y: ((y - x) ** 2).sum(-1), x, torch.zeros_like(x)),
                     lambda B, n: [(B, n)]),
    "argmin-NewtonCG": (lambda B, n: (_ones(B, n),),
                        lambda x: F.argmin(lambda x, y: ((y - x) ** 2).sum(-1), x,
                                           torch.zeros_like(x), solver=il.NewtonCG()),
                        lambda B, n: [(B, n)]),
    "argmin-ScipyMinimize": (lambda B, n: (_ones(B, n),),
                             lambda x: F.argmin(lambda x, y: ((y - x) ** 2).sum(-1), x,
                                                torch.zeros_like(x), solver=il.ScipyMinimize()),
                             lambda B, n: [(B, n)]),
    "least_squares-LM": (lambda B, n: (_ones(B, n),),
                         lambda x: F.least_squares(lambda x, y: y - x, x, torch.zeros_like(x)),
                         lambda B, n: [(B, n)]),
    "least_squares-GN": (lambda B, n: (_ones(B, n),),
                         lambda x: F.least_squares(lambda x, y: y - x, x, torch.zeros_like(x),
                                                   solver=il.GaussNewton()),
                         lambda B, n: [(B, n)]),
    "eq_qp-dense": (lambda B, n: (_eye(B, 3), _ones(B, 3), _ones(B, 1, 3), _ones(B, 1)),
                    lambda *qp: F.eq_qp(*qp, backend="dense"),
                    lambda B, n: [(B, 3), (B, 1)]),
    "eq_qp-osqp": (lambda B, n: (_eye(B, 3), _ones(B, 3), _ones(B, 1, 3), _ones(B, 1)),
                   lambda *qp: F.eq_qp(*qp, backend="osqp"),
                   lambda B, n: [(B, 3), (B, 1)]),
    "qp-InteriorPoint": (lambda B, n: (_eye(B, n), _ones(B, n), _ones(B, 1, n), _ones(B, 1)),
                         lambda Q, c, G, h: F.qp(Q, c, G=G, h=h),
                         lambda B, n: [(B, n), (B, 0), (B, 1)]),
    "qp-OSQP": (lambda B, n: (_eye(B, n), _ones(B, n), _ones(B, 1, n), _ones(B, 1)),
                lambda Q, c, G, h: F.qp(Q, c, G=G, h=h, solver=il.OSQP()),
                lambda B, n: [(B, n), (B, 0), (B, 1)]),
    "qp-equalities-only": (lambda B, n: (_eye(B, n), _ones(B, n), torch.zeros(B, 0, n, dtype=DT),
                                         torch.zeros(B, 0, dtype=DT)),
                           lambda Q, c, A, b: F.qp(Q, c, A, b),
                           lambda B, n: [(B, n), (B, 0), (B, 0)]),
    "lyapunov-schur": (lambda B, n: (-_eye(B, n), _eye(B, n)),
                       lambda A, Q: F.lyapunov(A, Q, backend="schur"),
                       lambda B, n: [(B, n, n)]),
    "lyapunov-eig": (lambda B, n: (-_eye(B, n), _eye(B, n)),
                     lambda A, Q: F.lyapunov(A, Q, backend="eig"),
                     lambda B, n: [(B, n, n)]),
    "discrete_lyapunov-schur": (lambda B, n: (0.5 * _eye(B, n), _eye(B, n)),
                                lambda A, Q: F.discrete_lyapunov(A, Q, backend="schur"),
                                lambda B, n: [(B, n, n)]),
    "discrete_lyapunov-eig": (lambda B, n: (0.5 * _eye(B, n), _eye(B, n)),
                              lambda A, Q: F.discrete_lyapunov(A, Q, backend="eig"),
                              lambda B, n: [(B, n, n)]),
    "sylvester-schur": (lambda B, n: (_eye(B, n), _eye(B, 2), _ones(B, n, 2)),
                        lambda A, B_, C: F.sylvester(A, B_, C, backend="schur"),
                        lambda B, n: [(B, n, 2)]),
    "sylvester-eig": (lambda B, n: (_eye(B, n), _eye(B, 2), _ones(B, n, 2)),
                      lambda A, B_, C: F.sylvester(A, B_, C, backend="eig"),
                      lambda B, n: [(B, n, 2)]),
    "smoothed_lp": (lambda B, n: (_ones(B, n),),
                    lambda c: F.smoothed_lp(c, G=-_eye(c.shape[0], c.shape[-1]),
                                            h=torch.zeros_like(c)),
                    lambda B, n: [(B, n)]),
    "perturbed_lp": (lambda B, n: (_ones(B, n),),
                     lambda c: F.perturbed_lp(c, G=-_eye(c.shape[0], c.shape[-1]),
                                              h=torch.ones_like(c)),
                     lambda B, n: [(B, n)]),
}

CASES = [pytest.param(name, B, n, id=f"{name}-B{B}-n{n}")
         for name in ENTRIES for B, n in ((0, 3), (2, 0), (0, 0))
         if not (name.startswith("eq_qp") and n == 0)]  # see the eq-QP test below


@pytest.mark.parametrize("name, B, n", CASES)
def test_empty_inputs_give_empty_outputs_and_gradients(name, B, n, capfd):
    make, call, shapes = ENTRIES[name]
    inputs = [t.requires_grad_() for t in make(B, n)]
    out = call(*inputs)
    out = out if isinstance(out, tuple) else (out,)
    assert [tuple(o.shape) for o in out] == shapes(B, n)
    assert all(o.dtype == DT for o in out)
    total = sum(o.sum() for o in out)
    if total.requires_grad:
        grads = torch.autograd.grad(total, inputs, allow_unused=True)
        for g, t in zip(grads, inputs):
            assert g is None or (g.shape == t.shape and bool(torch.isfinite(g).all()))
    captured = capfd.readouterr()
    assert captured.out == "" and "MKL" not in captured.err and "LAPACK" not in captured.err


def test_cvxpy_layer_with_an_empty_batch():
    p = torch.ones(0, 2, dtype=DT, requires_grad=True)
    (x,) = _cvxpy_layer()(p)
    assert x.shape == (0, 2)
    (g,) = torch.autograd.grad(x.sum(), p)
    assert g.shape == (0, 2)


def test_eq_qp_without_unknowns_has_dependent_rows():
    """n = 0 with m ≥ 1 rows (m = 0 is a ValueError): the rows cannot be independent."""
    with pytest.raises(il.SingularSystemError, match="linearly dependent"):
        F.eq_qp(_eye(2, 0), _ones(2, 0), _ones(2, 1, 0), _ones(2, 1))
