"""Random QPs with a known, strictly complementary solution (QP benchmark and tests)."""

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


def active_set_gradients(Q, c, A, b, G, h, x, lam, mu, x_bar):
    """Exact gradients of ``⟨x̄, x*⟩`` at a strictly complementary solution (active-set KKT).

    Solves ``[[Q, Aᵀ, Gₐᵀ], [A, 0, 0], [Gₐ, 0, 0]] w = [x̄; 0; 0]`` and returns the gradients
    ``(Q̄, c̄, Ā, b̄, Ḡ, h̄)`` (``Q̄`` symmetrized), independently of any layer's code.
    """
    n, p = Q.shape[-1], A.shape[-2]
    active = mu > 0
    Ga = G * active[..., None]
    m = G.shape[-2]
    eye_inactive = torch.diag_embed((~active).to(Q.dtype))
    K = torch.cat([
        torch.cat([Q, A.mT, Ga.mT], -1),
        torch.cat([A, Q.new_zeros(*Q.shape[:-2], p, p + m)], -1),
        torch.cat([Ga, Q.new_zeros(*Q.shape[:-2], m, p), -eye_inactive], -1),
    ], -2)
    rhs = torch.cat([x_bar, x_bar.new_zeros(*x_bar.shape[:-1], p + m)], -1)
    w = torch.linalg.solve(K, rhs)
    wx, wl, wm = w[..., :n], w[..., n:n + p], w[..., n + p:]
    outer = lambda u, v: u.unsqueeze(-1) * v.unsqueeze(-2)  # noqa: E731
    Q_bar = -0.5 * (outer(wx, x) + outer(x, wx))
    return Q_bar, -wx, -(outer(lam, wx) + outer(wl, x)), wl, -(outer(mu, wx) + outer(wm, x)), wm


def two_sided_qp(batch=(2,), n=4, m=6, p=1, dtype=torch.float64, seed=0, gap=0.5):
    """``(Q, c, A, b, G, lower, h), (x, lam, mu)`` for ``lower ≤ Gx ≤ h``, both sides active.

    Rows ``i ≡ 0 (mod 3)`` have their upper side active (``μᵢ ∈ [gap, 1 + gap]``), rows
    ``i ≡ 1`` their lower side (``μᵢ ∈ [−1 − gap, −gap]``, the signed convention of
    :class:`~implicit_layers.QPLayer`), the rest neither; every inactive side lies
    ``[gap, 1 + gap]`` away from ``Gx``. Strictly complementary, ``Q`` positive definite.
    """
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*batch, *s, generator=g, dtype=dtype)  # noqa: E731
    u = lambda: gap + torch.rand(*batch, m, generator=g, dtype=dtype)  # noqa: E731
    M = r(n, n)
    Q = M @ M.mT / n + 0.5 * torch.eye(n, dtype=dtype)
    A, G, x, lam = r(p, n), r(m, n), r(n), r(p)
    side = torch.arange(m) % 3
    upper, lower = side == 0, side == 1
    mu = torch.where(upper, u(), torch.where(lower, -u(), 0.0))
    mv = lambda M, v: (M @ v.unsqueeze(-1)).squeeze(-1)  # noqa: E731
    Gx = mv(G, x)
    h = Gx + torch.where(upper, 0.0, u())
    lo = Gx - torch.where(lower, 0.0, u())
    c = -(mv(Q, x) + mv(A.mT, lam) + mv(G.mT, mu))
    return (Q, c, A, mv(A, x), G, lo, h), (x, lam, mu)


def two_sided_gradients(Q, c, A, b, G, lower, h, x, lam, mu, x_bar):
    """:func:`active_set_gradients` for ``lower ≤ Gx ≤ h``: computed on the equivalent
    one-sided form ``[G; −G] x ≤ [h; −lower]`` with multipliers ``[μ⁺; μ⁻]`` and folded
    back, ``(Q̄, c̄, Ā, b̄, Ḡ, lower̄, h̄)`` with ``Ḡ = Ḡ₁ − Ḡ₂``, ``h̄ = h̄₁``, ``lower̄ = −h̄₂``."""
    m = G.shape[-2]
    stacked = active_set_gradients(Q, c, A, b, torch.cat([G, -G], -2), torch.cat([h, -lower], -1),
                                   x, lam, torch.cat([mu.clamp_min(0), (-mu).clamp_min(0)], -1), x_bar)
    Q_bar, c_bar, A_bar, b_bar, G_bar, h_bar = stacked
    return (Q_bar, c_bar, A_bar, b_bar, G_bar[..., :m, :] - G_bar[..., m:, :], -h_bar[..., m:],
            h_bar[..., :m])
