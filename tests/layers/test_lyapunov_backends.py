"""Backends of the Lyapunov/Sylvester layers: choice, fallback, factor reuse, and every error."""

from __future__ import annotations

import math

import pytest
import torch

import implicit_layers as il
from implicit_layers import functional as F
from implicit_layers.linalg.sylvester import eig as eig_sylvester
from implicit_layers.linalg.sylvester import schur
from implicit_layers.linalg.sylvester.eig import IllConditionedEigenbasis

f64 = dict(dtype=torch.float64)


def stable(*batch, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*batch, n, n, generator=g, **f64) - 2 * n**0.5 * torch.eye(n, **f64)


def rand(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), **f64)


@pytest.mark.parametrize(
    "batch, n, picked", [((), 5, "schur"), ((4,), 5, "eig"), ((2,), 70, "schur")]
)
def test_auto_picks_and_reports_backend(batch, n, picked):
    layer = il.LyapunovLayer()
    layer(stable(*batch, n=n), rand(*batch, n, n))
    assert layer.last_backend == picked
    assert layer.stats.forward.solver == picked


def test_backends_agree():
    A, Q = stable(5, n=6), rand(5, 6, 6)
    torch.testing.assert_close(F.lyapunov(A, Q, backend="eig"), F.lyapunov(A, Q, backend="schur"),
                               rtol=1e-10, atol=1e-12)
    S = 0.3 * A / A.abs().amax()
    torch.testing.assert_close(F.discrete_lyapunov(S, Q, backend="eig"),
                               F.discrete_lyapunov(S, Q, backend="schur"), rtol=1e-10, atol=1e-12)


def jordan_batch():
    """Defective A (a Jordan block): its eigenvector matrix is singular."""
    J = torch.tensor([[-1.0, 1.0, 0.0], [0.0, -1.0, 1.0], [0.0, 0.0, -1.0]], **f64)
    return torch.stack([J, J + 0.1 * rand(3, 3)])


def test_defective_matrix_eig_raises_auto_falls_back():
    A, Q = jordan_batch(), rand(2, 3, 3)
    with pytest.raises(il.SingularSystemError, match="ill-conditioned") as info:
        F.lyapunov(A, Q, backend="eig")
    assert isinstance(info.value, IllConditionedEigenbasis)
    layer = il.LyapunovLayer(backend="auto")
    P = layer(A, Q)
    assert layer.last_backend.startswith("schur (eig fallback: cond_F(V)")
    torch.testing.assert_close(A @ P + P @ A.mT, -Q, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(P, F.lyapunov(A, Q, backend="schur"))


def count_factorizations(monkeypatch):
    calls = []
    for cls in (schur.SchurFactor, eig_sylvester.EigFactor):
        original = cls.compute.__func__

        def counted(klass, *args, _original=original, **kw):
            calls.append(klass.__name__)
            return _original(klass, *args, **kw)

        monkeypatch.setattr(cls, "compute", classmethod(counted))
    return calls


@pytest.mark.parametrize("backend", ["schur", "eig"])
@pytest.mark.parametrize("solve", [F.lyapunov, F.discrete_lyapunov])
def test_one_factorization_serves_forward_backward_and_tangent(monkeypatch, backend, solve):
    calls = count_factorizations(monkeypatch)
    A = (0.1 * stable(2)).requires_grad_()
    Q = rand(2, 4, 4).requires_grad_()
    P = solve(A, Q, backend=backend)
    (gA,) = torch.autograd.grad((P * rand(2, 4, 4, seed=5)).sum(), A, create_graph=True)
    gA.square().sum().backward()  # double backward
    assert len(calls) == 1
    calls.clear()
    torch.func.jvp(lambda a: solve(a, Q.detach(), backend=backend), (A.detach(),),
                   (torch.ones_like(A),))
    assert len(calls) == 1
    calls.clear()
    torch.func.jacrev(lambda a: solve(a, Q.detach(), backend=backend))(A.detach())
    assert len(calls) == 1


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "A, Q, match",
    [
        (torch.zeros(3, 4, **f64), torch.zeros(3, 3, **f64), "A must be square"),
        (torch.zeros(3, 3, **f64), torch.zeros(4, 4, **f64), r"Q must have shape \(\*, 3, 3\)"),
        (torch.zeros(3, **f64), torch.zeros(3, 3, **f64), "A must have at least 2 dims"),
        (torch.zeros(2, 3, 3, **f64), torch.zeros(5, 3, 3, **f64), "do not broadcast"),
        (torch.zeros(3, 3, **f64), torch.zeros(3, 3), "Q has dtype torch.float32"),
        (torch.zeros(3, 3, dtype=torch.int64), torch.zeros(3, 3, **f64), "A must have a floating"),
        (torch.full((3, 3), math.nan, **f64), torch.zeros(3, 3, **f64), "A contains NaN or Inf"),
        (-torch.eye(3, **f64), torch.full((3, 3), math.inf, **f64), "Q contains NaN or Inf"),
    ],
)
def test_bad_input_raises_value_error(A, Q, match):
    with pytest.raises(ValueError, match=match):
        F.lyapunov(A, Q)


def test_non_finite_input_is_caught_under_vmap():
    A = -torch.eye(3, **f64).expand(2, 3, 3).clone()
    A[1, 0, 0] = math.nan
    with pytest.raises(ValueError, match="A contains NaN or Inf"):
        torch.func.vmap(F.lyapunov)(A, rand(2, 3, 3))


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        il.LyapunovLayer(backend="magic")


ROTATION = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], **f64)  # eigenvalues ±i (and on |z| = 1)


@pytest.mark.parametrize("backend", ["schur", "eig"])
@pytest.mark.parametrize(
    "solve, A",
    [
        (F.lyapunov, ROTATION),  # λ_1 + λ_2 = 0 on the imaginary axis
        (F.lyapunov, torch.diag(torch.tensor([1.0, -1.0 + 1e-15], **f64))),  # nearly singular
        (F.lyapunov, torch.zeros(2, 2, **f64)),
        (F.discrete_lyapunov, ROTATION),  # λ_1 λ_2 = 1 on the unit circle
        (F.discrete_lyapunov, torch.diag(torch.tensor([0.5, -1.0], **f64))),  # λ = −1
    ],
)
def test_singular_operator_raises(solve, A, backend):
    with pytest.raises(il.SingularSystemError, match="singular"):
        solve(torch.stack([A, A]), rand(2, 2, 2), backend=backend)
