"""The methods of the ``qp`` benchmark: ``(Q, c, A, b, G, lower, h) -> x``, one callable each.

``lower`` is ``None`` in the one-sided cases (``Gx ≤ h``). A method that has no two-sided form
(qpth, cvxpylayers) or is asked for the stacked one (``ours_stacked``) solves
``[G; −G] x ≤ [h; −lower]`` instead: the same solution, twice the inequality rows.
"""

from __future__ import annotations

import torch

import implicit_layers as il

#: proxsuite's own convention for a missing bound
PROXSUITE_INF = 1e20


def stacked(G, lower, h):
    """``(G, h)`` of the one-sided form of ``lower ≤ Gx ≤ h`` (unchanged if ``lower`` is None)."""
    if lower is None:
        return G, h
    return torch.cat([G, -G], -2), torch.cat([h, -lower], -1)


def ours(threads: int | None = None, stack: bool = False, **solver_options):
    """Our layer; ``threads`` torch threads during the call (default: the benchmark's);
    ``stack``: solve the stacked one-sided form instead of the native two-sided one."""
    layer = il.QPLayer(solver=il.InteriorPoint(**solver_options))

    def solve(Q, c, A, b, G, lower, h):
        before = torch.get_num_threads()
        torch.set_num_threads(threads or before)
        try:
            if stack:
                return layer(Q, c, A, b, *stacked(G, lower, h))[0]
            return layer(Q, c, A, b, G, h, lower=lower)[0]
        finally:
            torch.set_num_threads(before)

    return solve


def qpth():
    from qpth.qp import QPFunction

    fn = QPFunction(verbose=-1)

    def solve(Q, c, A, b, G, lower, h):
        return fn(Q, c, *stacked(G, lower, h), A, b)

    return solve


def proxsuite(**options):
    """proxsuite's torch QPLayer (``proxsuite.torch.qplayer.QPFunction``), native two-sided.

    ``QPFunction(...)`` stores ``omp_parallel`` in a module-level global that its backward
    reads, so the function is built afresh on every call: two variants interleaved in one
    process would otherwise run with whichever was built last. Its backward allocates the
    gradients in torch's default dtype (float32 here); autograd casts them back to float64,
    which bounds their accuracy near 1e-7 relative."""
    from proxsuite.torch.qplayer import QPFunction

    def solve(Q, c, A, b, G, lower, h):
        if lower is None:
            lower = torch.full_like(h.detach(), -PROXSUITE_INF)
        return QPFunction(**options)(Q, c, A, b, G, lower, h)[0]

    return solve


def cvxpylayers(n: int, m: int, p: int, solver_args: dict):
    """cvxpylayers needs DPP: ``Q = LLᵀ`` enters through ``‖Lᵀx‖²``; gradients reach ``Q`` via L
    (so its Q-gradient is not compared). ``m``: the rows of the one-sided form."""
    import cvxpy as cp
    from cvxpylayers.torch import CvxpyLayer

    x = cp.Variable(n)
    L, c, A, b, G, h = (cp.Parameter(s) for s in ((n, n), n, (p, n), p, (m, n), m))
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(L.T @ x) + c @ x), [A @ x == b, G @ x <= h])
    layer = CvxpyLayer(prob, parameters=[L, c, A, b, G, h], variables=[x])

    def solve(Q, c, A, b, G, lower, h):
        G, h = stacked(G, lower, h)
        Lq = torch.linalg.cholesky(Q)
        args = dict(solver_args)
        if not (torch.is_grad_enabled() and any(t.requires_grad for t in (Q, c, A, b, G, h))):
            # diffcp's forward-only path would pass these on to SCS, which rejects them
            args.pop("mode", None), args.pop("n_jobs_backward", None)
        return layer(Lq, c, A, b, G, h, solver_args=args)[0]

    return solve
