"""EqualityQPLayer: every documented error, for every backend that can raise it."""

from __future__ import annotations

import pytest
import scipy.sparse as sp
import torch

import implicit_layers as il
from implicit_layers import functional as F
from tests.layers.eq_qp_problems import DT, random_qp

DENSE = ["auto", "schur", "ldl"]


def dense(factorization):
    return il.EqualityQPLayer(il.DenseKKTBackend(factorization))


@pytest.mark.parametrize(
    "mutate, name",
    [
        (lambda Q, c, A, b: (Q[..., :-1], c, A, b), "Q"),
        (lambda Q, c, A, b: (Q, c[..., :-1], A, b), "c"),
        (lambda Q, c, A, b: (Q, c, A[..., :-1], b), "A"),
        (lambda Q, c, A, b: (Q, c, A, b[..., :-1]), "b"),
        (lambda Q, c, A, b: (Q, c, A, torch.zeros(3, 2, dtype=DT)), "broadcast"),
        (lambda Q, c, A, b: (Q, c.float(), A, b), "c"),
        (lambda Q, c, A, b: (Q, c, A.long(), b), "A"),
        (lambda Q, c, A, b: (Q, c, A, [1.0, 2.0]), "b"),
        (lambda Q, c, A, b: (Q, c, A[..., :0, :], b[..., :0]), "A"),
    ],
)
def test_malformed_input_raises_value_error_naming_argument(mutate, name):
    Q, c, A, b = mutate(*random_qp((2,), n=4, m=2))
    with pytest.raises(ValueError, match=name):
        F.eq_qp(Q, c, A, b)


@pytest.mark.parametrize("name", ["Q", "c", "A", "b"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_raises_value_error(name, bad):
    args = dict(zip("QcAb", random_qp((), n=4, m=2), strict=True))
    args[name] = args[name].clone()
    args[name].view(-1)[0] = bad
    with pytest.raises(ValueError, match=f"{name} contains NaN or Inf"):
        F.eq_qp(args["Q"], args["c"], args["A"], args["b"])


@pytest.mark.parametrize("factorization", DENSE)
def test_rank_deficient_a(factorization):
    Q, c, A, b = random_qp((2,), n=5, m=3)
    A = A.clone()
    A[1, 2] = A[1, 0] + 2 * A[1, 1]  # dependent rows in the second problem only
    with pytest.raises(il.SingularSystemError, match="A's rows are linearly dependent"):
        dense(factorization)(Q, c, A, b)


@pytest.mark.parametrize("factorization", DENSE)
def test_more_constraints_than_variables(factorization):
    Q, c, A, b = random_qp((), n=3, m=4)
    with pytest.raises(il.SingularSystemError, match="A's rows are linearly dependent"):
        dense(factorization)(Q, c, A, b)


@pytest.mark.parametrize("factorization", DENSE)
def test_q_indefinite_on_null_space(factorization):
    Q, c, A, b = random_qp((), n=5, m=2)
    Q = Q - 20 * torch.eye(5, dtype=DT)  # negative definite: a saddle point, not a minimum
    with pytest.raises(il.SingularSystemError, match="Q is not positive definite on the null"):
        dense(factorization)(Q, c, A, b)


@pytest.mark.parametrize("factorization", DENSE)
def test_q_singular_on_null_space(factorization):
    Q, c, A, b = random_qp((), n=4, m=1)
    A = torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=DT)
    Q = torch.diag(torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=DT))  # Q e₄ = 0 and A e₄ = 0
    with pytest.raises(il.SingularSystemError, match="Q is not positive definite on the null"):
        dense(factorization)(Q, c, A, b)


def test_schur_needs_positive_definite_q():
    Q, c, A, b = random_qp((), n=5, m=2, pd=False)
    with pytest.raises(il.SingularSystemError, match="factorization='schur' needs Q"):
        dense("schur")(Q, c, A, b)


def test_sparse_backend_errors():
    n, m = 6, 2
    c, b = torch.zeros(n, dtype=DT), torch.ones(m, dtype=DT)
    Q = sp.identity(n, format="csc")
    A = sp.csr_matrix([[1.0, 1, 0, 0, 0, 0], [2.0, 2, 0, 0, 0, 0]])
    with pytest.raises(il.SingularSystemError, match="A's rows are linearly dependent"):
        F.eq_qp(Q, c, A, b, backend="sparse")
    A = sp.csr_matrix([[1.0, 0, 0, 0, 0, 0], [0, 1.0, 0, 0, 0, 0]])
    with pytest.raises(il.SingularSystemError, match="Q is not positive definite on the null"):
        F.eq_qp(sp.diags([1.0, 1, 1, 1, 1, 0]), c, A, b, backend="sparse")
    with pytest.raises(il.SingularSystemError, match="Q is not positive definite on the null"):
        F.eq_qp(-sp.identity(n), c, A, b, backend="sparse")
    with pytest.raises(ValueError, match="A must be a torch sparse tensor or a SciPy sparse"):
        F.eq_qp(Q, c, torch.zeros(m, n, dtype=DT), b, backend="sparse")
    with pytest.raises(ValueError, match="A must have shape"):
        F.eq_qp(Q, c, sp.csr_matrix((m, n + 1)), b, backend="sparse")
    with pytest.raises(ValueError, match="c and b must be 1-D"):
        F.eq_qp(Q, c.expand(2, n), A, b, backend="sparse")
    bad = torch.eye(n, dtype=DT).to_sparse()
    bad = torch.sparse_coo_tensor(bad.indices(), bad.values() * float("nan"), (n, n))
    with pytest.raises(ValueError, match="Q contains NaN or Inf"):
        F.eq_qp(bad, c, A, b)


def test_osqp_non_convergence_raises_or_warns():
    Q, c, A, b = random_qp((2,), n=5, m=2)
    with pytest.raises(il.ConvergenceError, match="did not converge.*solver OSQP"):
        il.EqualityQPLayer(il.OSQPBackend(max_iter=2, warm_start=False))(Q, c, A, b)
    with pytest.warns(il.ConvergenceWarning, match="OSQP"):
        il.EqualityQPLayer(il.OSQPBackend(max_iter=2, warm_start=False, on_failure="warn"))(
            Q, c, A, b)


def test_bad_backend_arguments():
    with pytest.raises(ValueError, match="backend must be"):
        il.EqualityQPLayer("cholmod")
    with pytest.raises(ValueError, match="factorization must be"):
        il.DenseKKTBackend("qr")
    with pytest.raises(ValueError, match="refine must be"):
        il.DenseKKTBackend(refine=-1)
    with pytest.raises(ValueError, match="on_failure"):
        il.OSQPBackend(on_failure="ignore")


def test_osqp_backend_under_vmap_equals_the_batched_call():
    Q, c, A, b = random_qp((2,), n=4, m=2)
    layer = il.EqualityQPLayer("osqp")
    mapped = torch.func.vmap(layer)(Q, c, A, b)
    batched = layer(Q, c, A, b)
    for m, r in zip(mapped, batched, strict=True):
        torch.testing.assert_close(m, r, rtol=1e-7, atol=1e-7)


def test_every_backend_reports_solver_stats():
    Q = torch.eye(3, dtype=torch.float64)
    c = torch.randn(4, 3, dtype=torch.float64)
    A, b = torch.ones(1, 3, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    for backend in ("dense", "osqp"):
        layer = il.EqualityQPLayer(backend=backend)
        layer(Q, c, A, b)
        assert layer.stats.forward.all_converged, backend
        assert layer.stats.forward.converged.shape == (4,), backend
