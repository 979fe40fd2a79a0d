"""Small random equality QPs shared by the EqualityQPLayer tests, with a NumPy reference."""

from __future__ import annotations

import numpy as np
import torch

DT = torch.float64


def random_qp(batch=(), n=5, m=2, *, pd=True, seed=0, dtype=DT):
    """Q (PD, or PD only on null(A) when ``pd=False``), c, A (full row rank), b."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(*batch, n, n, generator=g, dtype=dtype)
    Q = X @ X.mT / n + 0.5 * torch.eye(n, dtype=dtype)
    A = torch.randn(*batch, m, n, generator=g, dtype=dtype)
    if not pd:  # subtract a multiple of the projector onto A's row space: indefinite Q
        P = A.mT @ torch.linalg.solve(A @ A.mT, A)
        Q = Q - 50.0 * P
    c = torch.randn(*batch, n, generator=g, dtype=dtype)
    b = torch.randn(*batch, m, generator=g, dtype=dtype)
    return Q, c, A, b


def reference(Q, c, A, b):
    """(x, λ) from ``numpy.linalg.solve`` on each assembled KKT matrix (float64)."""
    batch = torch.broadcast_shapes(Q.shape[:-2], c.shape[:-1], A.shape[:-2], b.shape[:-1])
    n, m = Q.shape[-1], A.shape[-2]
    Qn = Q.detach().double().expand(*batch, n, n).reshape(-1, n, n).numpy()
    An = A.detach().double().expand(*batch, m, n).reshape(-1, m, n).numpy()
    cn = c.detach().double().expand(*batch, n).reshape(-1, n).numpy()
    bn = b.detach().double().expand(*batch, m).reshape(-1, m).numpy()
    xs, ls = [], []
    for Qk, Ak, ck, bk in zip(Qn, An, cn, bn, strict=True):
        Qk = (Qk + Qk.T) / 2
        K = np.block([[Qk, Ak.T], [Ak, np.zeros((m, m))]])
        z = np.linalg.solve(K, np.concatenate([-ck, bk]))
        xs.append(z[:n])
        ls.append(z[n:])
    x = torch.as_tensor(np.array(xs)).reshape(*batch, n)
    lam = torch.as_tensor(np.array(ls)).reshape(*batch, m)
    return x, lam


def kkt_residual(Q, c, A, b, x, lam):
    Qs = (Q + Q.mT) / 2
    stat = (Qs @ x.unsqueeze(-1)).squeeze(-1) + c + (A.mT @ lam.unsqueeze(-1)).squeeze(-1)
    prim = (A @ x.unsqueeze(-1)).squeeze(-1) - b
    return max(float(stat.abs().max()), float(prim.abs().max()))


def count_calls(monkeypatch, names) -> dict:
    """Count calls of the named ``torch.linalg`` functions (factorizations) from now on."""
    calls = {"n": 0}
    for name in names:
        original = getattr(torch.linalg, name)

        def counting(*args, _original=original, **kwargs):
            calls["n"] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(torch.linalg, name, counting)
    return calls
