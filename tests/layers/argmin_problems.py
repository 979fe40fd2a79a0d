"""Argmin and least-squares problems with independent references (float64)."""

from __future__ import annotations

import torch

DT = torch.float64


def ridge(batch=(4,), n_samples=30, n_features=5, seed=0):
    """``f(w) = ½ mean((Xw − t)²) + ½ λ ‖w‖²`` per problem; ``x = (X, t, λ)``.

    Closed forms: ``w* = (XᵀX/N + λI)⁻¹ Xᵀt/N`` and ``dw*/dλ = −(XᵀX/N + λI)⁻¹ w*``."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(*batch, n_samples, n_features, generator=gen, dtype=DT)
    t = torch.randn(*batch, n_samples, generator=gen, dtype=DT)
    lam = 0.1 + torch.rand(batch, generator=gen, dtype=DT)

    def objective(x, w):
        X, t, lam = x
        res = (X @ w.unsqueeze(-1)).squeeze(-1) - t
        return 0.5 * res.square().mean(-1) + 0.5 * lam * w.square().sum(-1)

    def hessian(X, lam):
        eye = torch.eye(X.shape[-1], dtype=DT)
        return X.mT @ X / X.shape[-2] + lam[..., None, None] * eye

    def solution(X, t, lam):
        rhs = (X.mT @ t.unsqueeze(-1)).squeeze(-1) / X.shape[-2]
        return torch.linalg.solve(hessian(X, lam), rhs)

    def d_lambda(X, t, lam):
        return -torch.linalg.solve(hessian(X, lam), solution(X, t, lam))

    return objective, (X, t, lam), solution, d_lambda


def logistic(n_samples=60, n_features=4, C=2.0, seed=0):
    """L2-regularized logistic regression in scikit-learn's scaling:
    ``f(w) = C Σ log(1 + exp(−s_i x_iᵀw)) + ½‖w‖²``, labels ``s ∈ {−1, 1}``."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n_samples, n_features, generator=gen, dtype=DT)
    w_true = torch.randn(n_features, generator=gen, dtype=DT)
    labels = torch.where(torch.rand(n_samples, generator=gen, dtype=DT)
                         < torch.sigmoid(2 * X @ w_true), 1.0, -1.0).to(DT)

    def objective(x, w):
        X, s, C = x
        margins = s * (X @ w.unsqueeze(-1)).squeeze(-1)
        return C * torch.nn.functional.softplus(-margins).sum(-1) + 0.5 * w.square().sum(-1)

    return objective, (X, labels, torch.tensor(C, dtype=DT))


def exp_decay(batch=(3,), n_points=25, noise=0.05, seed=0):
    """Residuals ``a e^{−k t} + c − data`` for noisy data of known ``(a, k, c)``."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 4, n_points, dtype=DT)
    params = torch.stack([2 + torch.rand(batch, generator=gen, dtype=DT),
                          0.5 + torch.rand(batch, generator=gen, dtype=DT),
                          0.3 * torch.randn(batch, generator=gen, dtype=DT)], -1)
    clean = params[..., :1] * torch.exp(-params[..., 1:2] * t) + params[..., 2:]
    data = clean + noise * torch.randn(clean.shape, generator=gen, dtype=DT)

    def residual(x, p):
        t, data = x
        return p[..., :1] * torch.exp(-p[..., 1:2] * t) + p[..., 2:] - data

    return residual, (t, data), params


def rosenbrock_residual(x, y):
    """Optimistix / TUOS Rosenbrock in residual form: ``(10 (y_{i+1} − y_i²), x − y_i)``,
    minimum 0 at ``y = x`` when ``x = 1`` (the chain ``y_{i+1} = y_i²`` holds)."""
    return torch.cat([10 * (y[..., 1:] - y[..., :-1] ** 2), x - y[..., :-1]], -1)


def variably_dimensioned(x, y):
    """TUOS eqn 25: residuals ``y − x``, ``Σ i (y_i − x)`` and its square; minimum 0 at y = x."""
    i = torch.arange(1, y.shape[-1] + 1, dtype=y.dtype)
    s = ((y - x) * i).sum(-1, keepdim=True)
    return torch.cat([y - x, s, s**2], -1)


def beale(x, y):
    """Beale's function with constants ``x = (1.5, 2.25, 2.625)``; minimum 0 at (3, 0.5)."""
    a, b = y[..., 0], y[..., 1]
    return sum((x[..., i] - a + a * b ** (i + 1)) ** 2 for i in range(3))


def matyas(x, y):
    """Matyas' function ``x₀ (a² + b²) − x₁ a b``; minimum 0 at the origin for x = (0.26, 0.48)."""
    a, b = y[..., 0], y[..., 1]
    return x[..., 0] * (a**2 + b**2) - x[..., 1] * a * b


def diagonal_bowl(x, y):
    """``Σ y_i² (0.1 + x_i²)``: minimum 0 at the origin."""
    return (y.square() * (0.1 + x.square())).sum(-1)
