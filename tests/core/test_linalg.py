"""Dense and Krylov linear solvers: accuracy, transposes, per-sample stopping, singularity."""

import pytest
import torch

import implicit_layers as il
from implicit_layers.linalg import LinearOperator, lu_factor

DT = torch.float64


def _system(B=4, n=12, spd=False):
    A = torch.randn(B, n, n, dtype=DT) + 2 * n**0.5 * torch.eye(n, dtype=DT)
    if spd:
        A = A @ A.mT
    return A, torch.randn(B, n, dtype=DT)


@pytest.mark.parametrize("solver,spd", [
    (il.LU(), False), (il.Cholesky(), True), (il.GMRES(rtol=1e-12), False),
    (il.BiCGStab(rtol=1e-12), False), (il.CG(rtol=1e-12, max_iter=500), True),
])
@pytest.mark.parametrize("transpose", [False, True])
def test_solves_match_torch(solver, spd, transpose):
    A, b = _system(spd=spd)
    fac = solver.factor(LinearOperator.from_dense(A))
    x = fac.solve(b, transpose=transpose)
    ref = torch.linalg.solve(A.mT if transpose else A, b)
    torch.testing.assert_close(x, ref, atol=1e-9, rtol=0)
    assert fac.stats.all_converged


def test_krylov_stops_per_sample():
    A, b = _system(B=3)
    A[0] = torch.eye(A.shape[-1], dtype=DT)  # converges in one step
    fac = il.GMRES(rtol=1e-12).factor(LinearOperator.from_dense(A))
    x = fac.solve(b)
    torch.testing.assert_close(x, torch.linalg.solve(A, b), atol=1e-9, rtol=0)
    # the identity's sample is done after a step or two (round-off may ask for a restart);
    # the others go on without it, and it does not wait for them
    its = fac.stats.iterations
    assert its[0] <= 2 and bool((its[1:] > its[0]).all())


def test_krylov_reports_non_convergence():
    A, b = _system()
    fac = il.GMRES(max_iter=2).factor(LinearOperator.from_dense(A))
    fac.solve(b)
    assert not fac.stats.converged.any()


@pytest.mark.parametrize("solver", [il.LU(), il.Cholesky()])
def test_singular_matrix_raises(solver):
    A = torch.ones(2, 3, 3, dtype=DT)
    with pytest.raises(il.SingularSystemError):
        solver.factor(A)


def test_cholesky_rejects_indefinite():
    with pytest.raises(il.SingularSystemError, match="not positive definite"):
        il.Cholesky().factor(torch.diag(torch.tensor([1.0, -1.0], dtype=DT)))


def test_batched_lu_is_safe_with_two_threads():
    """pytorch#142815: batched CPU LU of ≥151×151 matrices with 2 threads gave invalid pivots."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        A = torch.randn(32, 300, 300, dtype=DT)
        b = torch.randn(32, 300, dtype=DT)
        LU, piv = lu_factor(A)
        assert bool(((piv >= 1) & (piv <= 300)).all())
        x = torch.linalg.lu_solve(LU, piv, b.unsqueeze(-1)).squeeze(-1)
        assert (A @ x.unsqueeze(-1)).squeeze(-1).sub(b).abs().max() < 1e-9
    finally:
        torch.set_num_threads(threads)
