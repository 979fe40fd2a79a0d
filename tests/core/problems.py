"""A small zoo of well-posed implicit problems with explicit references (float64)."""

from __future__ import annotations

import torch

DT = torch.float64


def linear_system(batch=(3,), n=4):
    """``A y − b = 0``; reference ``y = A⁻¹ b``."""
    A = torch.randn(*batch, n, n, dtype=DT) + 2 * n**0.5 * torch.eye(n, dtype=DT)
    b = torch.randn(*batch, n, dtype=DT)

    def residual(x, y):
        A, b = x
        return (A @ y.unsqueeze(-1)).squeeze(-1) - b

    def reference(A, b):
        return torch.linalg.solve(A, b)

    return residual, (A, b), torch.zeros(*batch, n, dtype=DT), reference


def matrix_inverse(batch=(2,), n=3):
    """``X Y − I = 0`` with ``Y`` an n×n unknown (event_ndim=2); reference ``Y = X⁻¹``."""
    X = torch.randn(*batch, n, n, dtype=DT) + 2 * n**0.5 * torch.eye(n, dtype=DT)

    def residual(X, Y):
        return X @ Y - torch.eye(X.shape[-1], dtype=X.dtype)

    return residual, X, torch.zeros(*batch, n, n, dtype=DT), torch.linalg.inv


def cube_root(n=5):
    """Scalar-per-entry ``y³ − x = 0`` (event_ndim=0); reference ``y = sign(x)|x|^{1/3}``."""
    x = torch.rand(n, dtype=DT) * 5 + 0.5

    def residual(x, y):
        return y**3 - x

    return residual, x, torch.ones(n, dtype=DT), lambda x: x ** (1 / 3)


def tanh_equilibrium(batch=(4,), n=5, rho=0.5):
    """``y = tanh(W y + x)`` as ``f = tanh(W y + x) − y`` (contractive; no closed form)."""
    W = torch.randn(n, n, dtype=DT)
    W = rho * W / torch.linalg.matrix_norm(W, ord=2)
    x = torch.randn(*batch, n, dtype=DT)

    def residual(x, y):
        W, u = x
        return torch.tanh(y @ W.mT + u) - y

    def reference(W, u, iters=300):  # unrolled fixed-point iteration, differentiable
        y = torch.zeros_like(u)
        for _ in range(iters):
            y = torch.tanh(y @ W.mT + u)
        return y

    return residual, (W, x), torch.zeros(*batch, n, dtype=DT), reference
