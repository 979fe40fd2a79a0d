"""Random QPs with a known, strictly complementary solution (shared by the QP tests)."""

from __future__ import annotations

import torch


def strictly_complementary_qp(batch=(2,), n=4, m=5, p=1, dtype=torch.float64, seed=0,
                              psd_rank=None, gap=0.5):
    """``(Q, c, A, b, G, h), (x, lam, mu)`` with about half the inequalities active.

    Active constraints have ``μᵢ ∈ [gap, 1 + gap]`` and zero slack; inactive ones have
    ``μᵢ = 0`` and slack in ``[gap, 1 + gap]``, so the solution is strictly complementary
    and the gradient is well defined. ``psd_rank`` < n gives a singular PSD ``Q``.
    """
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*batch, *s, generator=g, dtype=dtype)  # noqa: E731
    M = r(n, psd_rank or n)
    Q = M @ M.mT / n + (0 if psd_rank else 0.5) * torch.eye(n, dtype=dtype)
    A, G, x = r(p, n), r(m, n), r(n)
    active = torch.arange(m) < (m + 1) // 2
    u = gap + torch.rand(*batch, m, generator=g, dtype=dtype)
    mu = torch.where(active, u, 0.0)
    slack = torch.where(active, 0.0, u)
    lam = r(p)
    mv = lambda M, v: (M @ v.unsqueeze(-1)).squeeze(-1)  # noqa: E731
    h = mv(G, x) + slack
    b = mv(A, x)
    c = -(mv(Q, x) + mv(A.mT, lam) + mv(G.mT, mu))
    return (Q, c, A, b, G, h), (x, lam, mu)
