"""QPLayer: a differentiable convex QP with equality and inequality constraints (OptNet-class).

    x*(θ) = argmin_x ½ xᵀQx + cᵀx   s.t.  Ax = b,  Gx ≤ h,      θ = (Q, c, A, b, G, h)

returning the primal solution ``x`` and the multipliers ``λ`` (equalities), ``μ ≥ 0``
(inequalities). The forward pass runs a solver (default :class:`InteriorPoint`, torch only;
:class:`~implicit_layers.solvers.qp.osqp.OSQP` on CPU); the backward and the JVP apply the
implicit function theorem to the KKT conditions at the solution,

    F(z, θ) = [ Qx + c + Aᵀλ + Gᵀμ ;  Ax − b ;  μ ∘ (Gx − h) ] = 0,     z = (x, λ, μ).

Derivation (ż tangents, z̄ adjoints; s = h − Gx the slack). Differentiating F = 0:

    Q ẋ + Aᵀλ̇ + Gᵀμ̇ = −(Q̇x + ċ + Ȧᵀλ + Ġᵀμ)
    A ẋ             = −(Ȧx − ḃ)
    μ∘Gẋ − s∘μ̇      = −μ∘(Ġx − ḣ)        (complementarity; divide this row by μ > 0)

    pushforward:  M ż = −[Q̇x + ċ + Ȧᵀλ + Ġᵀμ;  Ȧx − ḃ;  Ġx − ḣ],   M = [[Q, Aᵀ, Gᵀ], [A, 0, 0], [G, 0, −S/Z]]

``M`` is symmetric and is exactly the interior point's KKT matrix at the returned point, so
both directions reuse the solver's final factorization. Pullback: with ``w = M⁻¹ z̄``,

    ⟨z̄, ż⟩ = −⟨w, [Q̇x + ċ + Ȧᵀλ + Ġᵀμ; Ȧx − ḃ; Ġx − ḣ]⟩  ⇒
    Q̄ = −w₁xᵀ,  c̄ = −w₁,  Ā = −(λw₁ᵀ + w₂xᵀ),  b̄ = w₂,  Ḡ = −(μw₁ᵀ + w₃xᵀ),  h̄ = w₃.

(``Q`` is symmetrized on entry, so ``Q̄`` comes back symmetric.) Degenerate constraints
(``sᵢ = μᵢ = 0``, weakly active) get the finite gradient of the interior point's final
central-path point: ``sᵢ/μᵢ`` there interpolates between treating the constraint as active
(``sᵢ/μᵢ → 0``: ``Gᵢẋ = ḣᵢ − Ġᵢx``) and inactive (``sᵢ/μᵢ → ∞``: ``μ̇ᵢ = 0``).

Failures are per sample: a sample whose status is not ``SOLVED`` raises
:class:`~implicit_layers.ConvergenceError` (``on_failure="raise"``) or, with
``on_failure="warn"``, warns, returns the solver's last iterate (non-finite entries set to 0)
and receives exactly zero gradient, leaving the rest of the batch untouched.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from implicit_layers.core.checks import check_policy, check_same_dtype_device, check_tensor
from implicit_layers.layers.qp.kkt_solve import KKTSolve
from implicit_layers.linalg.kkt.inequality import _mv
from implicit_layers.solvers.qp import InteriorPoint, QPSolution, QPStatus
from implicit_layers.stats import LayerStats, enforce


def _outer(u: Tensor, v: Tensor) -> Tensor:
    return u.unsqueeze(-1) * v.unsqueeze(-2)


class _Call:
    """One layer call: the solver, the policy, and (after forward) the solution."""

    def __init__(self, solver, on_failure: str, stats: LayerStats):
        self.solver, self.on_failure, self.stats = solver, on_failure, stats
        self.solution: QPSolution | None = None


class _QPFunction(torch.autograd.Function):
    @staticmethod
    def forward(Q, c, A, b, G, h, call):
        sol = call.solver.solve(Q, c, A, b, G, h)
        call.stats.forward = sol.stats
        bad = sol.status != QPStatus.SOLVED
        if bool(bad.any()):
            names = [f"{int((sol.status == s).sum())} {s.name.lower()}" for s in QPStatus
                     if s != QPStatus.SOLVED and bool((sol.status == s).any())]
            enforce(sol.stats, call.on_failure, f"QPLayer ({call.solver.name}: {', '.join(names)})")
        call.solution = sol
        finite = lambda t: torch.where(torch.isfinite(t), t, torch.zeros((), dtype=t.dtype))  # noqa: E731
        return finite(sol.x), finite(sol.lam), finite(sol.mu)

    @staticmethod
    def setup_context(ctx, inputs, output):
        Q, c, A, b, G, h, call = inputs
        ctx.call = call
        ctx.save_for_backward(Q, A, G, h, *output)
        ctx.save_for_forward(Q, A, G, h, *output)

    @staticmethod
    def _system(ctx):
        Q, A, G, h, x, lam, mu = ctx.saved_tensors
        G_eff, w, keep = ctx.call.solver.derivative_system(ctx.call.solution, G, h, x, mu)
        return Q, A, G, G_eff, w, keep, x, lam, mu

    @staticmethod
    def backward(ctx, x_bar, lam_bar, mu_bar):
        Q, A, G, G_eff, w, keep, x, lam, mu = _QPFunction._system(ctx)
        if keep is not None:
            mu_bar = mu_bar * keep
        fac = ctx.call.solution.factor
        w1, w2, w3 = KKTSolve.apply(fac, Q, A, G_eff, w, x_bar, lam_bar, mu_bar, 1)
        Q_bar = -_outer(w1, x)
        A_bar = -(_outer(lam, w1) + _outer(w2, x))
        G_bar = -(_outer(mu, w1) + _outer(w3, x))
        return Q_bar, -w1, A_bar, w2, G_bar, w3, None

    @staticmethod
    def jvp(ctx, dQ, dc, dA, db, dG, dh, _call):
        Q, A, G, G_eff, w, keep, x, lam, mu = _QPFunction._system(ctx)
        z = lambda d, like: d if d is not None else torch.zeros_like(like)  # noqa: E731
        dQ, dA, dG = z(dQ, Q), z(dA, A), z(dG, G)
        r1 = _mv(dQ, x) + z(dc, x) + _mv(dA.mT, lam) + _mv(dG.mT, mu)
        r2 = _mv(dA, x) - z(db, lam)
        r3 = _mv(dG, x) - z(dh, mu)
        if keep is not None:
            r3 = r3 * keep
        with torch.no_grad():
            return tuple(KKTSolve.forward(ctx.call.solution.factor, Q, A, G_eff, w, -r1, -r2, -r3, 1))

    @staticmethod
    def vmap(info, in_dims, Q, c, A, b, G, h, call):
        V = info.batch_size
        flat = []
        for t, d in zip((Q, c, A, b, G, h), in_dims[:6], strict=True):
            t = t.expand(V, *t.shape) if d is None else t.movedim(d, 0)
            flat.append(t.reshape(-1, *t.shape[2:]))
        out = _QPFunction.apply(*flat, call)
        return tuple(o.reshape(V, -1, *o.shape[1:]) for o in out), (0, 0, 0)


class QPLayer(nn.Module):
    """Differentiable convex QP ``min ½xᵀQx + cᵀx s.t. Ax = b, Gx ≤ h`` (OptNet-class).

    Args:
        solver: the forward solver, :class:`InteriorPoint` (default; torch, CPU/CUDA) or
            :class:`~implicit_layers.solvers.qp.osqp.OSQP` (CPU, sparse-friendly).
        on_failure: ``"raise"`` (default) or ``"warn"``; see the module docstring.

    ``forward(Q, c, A=None, b=None, G=None, h=None) -> (x, lam, mu)`` with ``Q (*, n, n)``
    positive semidefinite, ``c (*, n)``, ``A (*, p, n)``, ``b (*, p)``, ``G (*, m, n)``,
    ``h (*, m)``; leading dims broadcast. ``stats.forward.extra["status"]`` holds each
    sample's :class:`QPStatus`.

    >>> import torch, implicit_layers as il
    >>> Q = torch.eye(2, dtype=torch.float64); c = torch.tensor([-1., -1.], dtype=torch.float64)
    >>> G = torch.ones(1, 2, dtype=torch.float64); h = torch.ones(1, dtype=torch.float64)
    >>> x, lam, mu = il.QPLayer()(Q, c, None, None, G, h)
    >>> x.round(decimals=6), mu.round(decimals=6)
    (tensor([0.5000, 0.5000], dtype=torch.float64), tensor([0.5000], dtype=torch.float64))
    """

    def __init__(self, solver=None, on_failure: str = "raise"):
        super().__init__()
        self.solver = solver if solver is not None else InteriorPoint()
        self.on_failure = check_policy(on_failure)
        self.stats = LayerStats()

    @classmethod
    def from_cvxpy(cls, problem, parameters, variables, **kwargs):
        """Build a layer from a parametrized cvxpy QP; see :class:`CvxpyQPLayer`."""
        from implicit_layers.layers.qp.cvxpy import CvxpyQPLayer

        return CvxpyQPLayer(problem, parameters, variables, layer=cls(**kwargs))

    def forward(self, Q, c, A=None, b=None, G=None, h=None):
        Q, c, A, b, G, h = _check_inputs(Q, c, A, b, G, h)
        batch = torch.broadcast_shapes(Q.shape[:-2], c.shape[:-1], A.shape[:-2], b.shape[:-1],
                                       G.shape[:-2], h.shape[:-1])
        B = batch.numel()

        def flat(t: Tensor, event: int) -> Tensor:
            return t.expand(*batch, *t.shape[t.ndim - event:]).reshape(B, *t.shape[t.ndim - event:])

        Q = 0.5 * (Q + Q.mT)
        call = _Call(self.solver, self.on_failure, self.stats)
        x, lam, mu = _QPFunction.apply(flat(Q, 2), flat(c, 1), flat(A, 2), flat(b, 1),
                                       flat(G, 2), flat(h, 1), call)
        return tuple(t.reshape(*batch, t.shape[-1]) for t in (x, lam, mu))


def _check_inputs(Q, c, A, b, G, h):
    Q = check_tensor("Q", Q, min_ndim=2)
    c = check_tensor("c", c, min_ndim=1)
    n = Q.shape[-1]
    if Q.shape[-2] != n:
        raise ValueError(f"Q must be square (*, n, n), got shape {tuple(Q.shape)}")
    if c.shape[-1] != n:
        raise ValueError(f"c must have shape (*, {n}) to match Q, got {tuple(c.shape)}")
    pairs = {}
    for mat, vec, mname, vname in ((A, b, "A", "b"), (G, h, "G", "h")):
        if (mat is None) != (vec is None):
            raise ValueError(f"{mname} and {vname} must be given together (or both None)")
        if mat is None:
            mat, vec = Q.new_zeros(n, 0).mT, Q.new_zeros(0)
        mat = check_tensor(mname, mat, min_ndim=2)
        vec = check_tensor(vname, vec, min_ndim=1)
        if mat.shape[-1] != n:
            raise ValueError(f"{mname} must have {n} columns to match Q, got shape {tuple(mat.shape)}")
        if vec.shape[-1] != mat.shape[-2]:
            raise ValueError(f"{vname} must have shape (*, {mat.shape[-2]}) to match {mname}, "
                             f"got {tuple(vec.shape)}")
        pairs[mname], pairs[vname] = mat, vec
    check_same_dtype_device({"Q": Q, "c": c, **pairs})
    return Q, c, pairs["A"], pairs["b"], pairs["G"], pairs["h"]
