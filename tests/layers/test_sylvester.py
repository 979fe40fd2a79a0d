"""SylvesterLayer / F.sylvester: A X + X B = C against SciPy, derivatives, transforms, errors."""

from __future__ import annotations

import pytest
import scipy.linalg as sla
import torch
from torch.autograd import gradcheck, gradgradcheck

import implicit_layers as il
from implicit_layers import functional as F

f64 = dict(dtype=torch.float64)
BACKENDS = ["schur", "eig"]


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), **f64)


def problem(batch=(2,), n=4, m=3):
    A = rand(*batch, n, n, seed=1) + 3 * torch.eye(n, **f64)  # spectra well apart from −spec(B)
    B = rand(*batch, m, m, seed=2) + 3 * torch.eye(m, **f64)
    return A, B, rand(*batch, n, m, seed=3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_scipy(backend):
    A, B, C = problem((3,), 6, 4)
    X = F.sylvester(A, B, C, backend=backend)
    for i in range(3):
        ref = torch.from_numpy(sla.solve_sylvester(A[i].numpy(), B[i].numpy(), C[i].numpy()))
        torch.testing.assert_close(X[i], ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_gradgradcheck_and_forward_mode(backend):
    A, B, C = (t.requires_grad_() for t in problem((2,), 3, 2))

    def f(A, B, C):
        return F.sylvester(A, B, C, backend=backend)

    assert gradcheck(f, (A, B, C))
    assert gradgradcheck(f, (A, B, C))
    assert gradcheck(f, (A, B, C), check_forward_ad=True, check_backward_ad=False,
                     check_undefined_grad=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_jvp_matches_finite_differences(backend):
    A, B, C = problem((2,), 4, 3)
    dA, dB, dC = rand(2, 4, 4, seed=4), rand(2, 3, 3, seed=5), rand(2, 4, 3, seed=6)

    def f(A, B, C):
        return F.sylvester(A, B, C, backend=backend)

    _, tangent = torch.func.jvp(f, (A, B, C), (dA, dB, dC))
    h = 1e-6
    fd = (f(A + h * dA, B + h * dB, C + h * dC) - f(A - h * dA, B - h * dB, C - h * dC)) / (2 * h)
    torch.testing.assert_close(tangent, fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_and_broadcasting(backend):
    A, B, C = problem((3,), 4, 2)

    def f(A, B, C):
        return F.sylvester(A, B, C, backend=backend)

    torch.testing.assert_close(torch.func.vmap(f)(A, B, C), f(A, B, C), rtol=0, atol=1e-13)
    # B shared across the batch, by vmap and by broadcasting; it gets the summed gradient
    torch.testing.assert_close(torch.func.vmap(f, in_dims=(0, None, 0))(A, B[0], C),
                               f(A, B[0], C), rtol=0, atol=1e-13)
    B0 = B[0].clone().requires_grad_()
    f(A, B0, C).sum().backward()
    want = sum(torch.autograd.grad(f(A[i], B0, C[i]).sum(), B0)[0] for i in range(3))
    torch.testing.assert_close(B0.grad, want)


def test_layer_reports_backend():
    layer = il.SylvesterLayer(backend="schur")
    X = layer(*problem((), 3, 2))
    assert layer.last_backend == "schur" and X.shape == (3, 2)


@pytest.mark.parametrize(
    "shapes, match",
    [
        (((3, 3), (2, 3), (3, 2)), "B must be square"),
        (((3, 3), (2, 2), (2, 3)), r"C must have shape \(\*, 3, 2\)"),
        (((2, 3, 3), (2, 2), (4, 3, 2)), "do not broadcast"),
    ],
)
def test_bad_shapes(shapes, match):
    A, B, C = (torch.ones(s, **f64) for s in shapes)
    with pytest.raises(ValueError, match=match):
        F.sylvester(A, B, C)


@pytest.mark.parametrize("backend", BACKENDS)
def test_common_eigenvalues_of_a_and_minus_b_are_singular(backend):
    A = torch.diag(torch.tensor([1.0, 2.0], **f64))
    B = torch.diag(torch.tensor([-2.0, 5.0], **f64))  # λ_2(A) + μ_1(B) = 0
    with pytest.raises(il.SingularSystemError, match=r"λ_i\(A\) \+ λ_j\(B\) ≈ 0"):
        F.sylvester(A, B, torch.ones(2, 2, **f64), backend=backend)


@pytest.mark.parametrize("which", ["B", "C"])
def test_non_finite_values_are_named(which):
    A, B, C = problem((), 3, 2)
    (B if which == "B" else C)[0, 0] = float("nan")
    with pytest.raises(ValueError, match=f"{which} contains NaN or Inf"):
        F.sylvester(A, B, C)
