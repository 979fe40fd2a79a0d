"""QPLayer: a differentiable convex QP with equality and two-sided inequality constraints.

    x*(θ) = argmin_x ½ xᵀQx + cᵀx   s.t.  Ax = b,  l ≤ Gx ≤ h,      θ = (Q, c, A, b, G, l, h)

returning the primal solution ``x`` and the multipliers ``λ`` (equalities) and ``μ``
(inequalities, signed: ``μᵢ > 0`` where the upper bound is active, ``< 0`` where the lower one
is, 0 elsewhere), with ``Qx + c + Aᵀλ + Gᵀμ = 0``.

An :class:`~implicit_layers.ImplicitLayer` with ``y = (x, λ, μ, σ)`` (``σ`` the active sides,
see :mod:`~implicit_layers.layers.qp.forward`). The forward solver
(:class:`~implicit_layers.InteriorPoint` by default, or :class:`~implicit_layers.OSQP`) ends
with the solution's active set and the factorization of its derivative KKT matrix ``K``
(:mod:`implicit_layers.solvers.qp.active_set`, where the gradient contract at degenerate
points is stated); the residual is the one whose Jacobian that is,

    F(θ, y) = [ Qx + c + Aᵀλ + G_𝒜ᵀμ ;  Ax − b ;  a⁺∘(Gx − h) + a⁻∘(Gx − l) − (1 − a)∘μ ],

so the core's backward, JVP and double backward reuse the forward's factorization.
Pullback (a closed form replaces the generic VJP of F, for speed): with ``w = K⁻ᵀ(x̄, λ̄, μ̄)``
and θ̄ = −(∂F/∂θ)ᵀ w,

    Q̄ = −½(w₁xᵀ + xw₁ᵀ),  c̄ = −w₁,  Ā = −(λw₁ᵀ + w₂xᵀ),  b̄ = w₂,
    Ḡ = −(μw₁ᵀ + (a∘w₃)xᵀ),  h̄ = a⁺∘w₃,  l̄ = a⁻∘w₃.

(``Q`` is symmetrized on entry, so ``Q̄`` is symmetric; an input broadcast over batch dims
receives the sum of the per-sample gradients.)

Failures are per sample: a sample whose status is not ``SOLVED`` raises
:class:`~implicit_layers.ConvergenceError` (``on_failure="raise"``) whose message says why
(infeasible, unbounded, iterations, numerical) or, with ``on_failure="warn"``, warns, returns
the solver's last iterate (non-finite entries set to 0) and receives exactly zero gradient,
leaving the rest of the batch untouched. With ``infeasible="closest"`` an infeasible sample is
solved as the closest feasible QP instead (:mod:`implicit_layers.layers.qp.closest`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from implicit_layers.checks import check_policy, check_same_dtype_device, check_tensor
from implicit_layers.compat import is_wrapped
from implicit_layers.core.adjoint import FactorizationAdjoint
from implicit_layers.core.layer import ImplicitLayer
from implicit_layers.layers.qp.closest import resolve_closest
from implicit_layers.layers.qp.forward import QPForward, qp_pullback, qp_residual, split
from implicit_layers.solvers.qp import InteriorPoint, QPSolver

#: non-batch dims of (Q, c, A, b, G, lower, upper)
EVENT_NDIMS = (2, 1, 2, 1, 2, 1, 1)
NAMES = ("Q", "c", "A", "b", "G", "lower", "h")


class QPLayer(ImplicitLayer):
    """Differentiable convex QP ``min ½xᵀQx + cᵀx s.t. Ax = b, lower ≤ Gx ≤ h`` (OptNet class).

    Args:
        solver: the forward :class:`~implicit_layers.QPSolver`:
            :class:`~implicit_layers.InteriorPoint` (default; torch, CPU/CUDA) or
            :class:`~implicit_layers.OSQP` (CPU, sparse-friendly).
        on_failure: ``"raise"`` (default) or ``"warn"``; see the module docstring.
        infeasible: ``"raise"`` (default): an infeasible sample is a failure; ``"closest"``:
            solve the QP whose constraints are shifted by the least-norm shift that makes
            them feasible (proxsuite's closest feasible QP), status ``CLOSEST_FEASIBLE``,
            the shift in ``stats.forward.extra["shift"]``, differentiated like any other.

    ``forward(Q, c, A=None, b=None, G=None, h=None, lower=None) -> (x, lam, mu)`` with
    ``Q (*, n, n)`` positive semidefinite, ``c (*, n)``, ``A (*, p, n)``, ``b (*, p)``,
    ``G (*, m, n)``, ``h (*, m)``, ``lower (*, m)``; leading dims broadcast. ``h`` may hold
    ``+inf`` and ``lower`` ``−inf`` (no bound on that side; so does any bound of magnitude
    ``≥ 1e20``); ``lower=None`` means no lower bounds, ``h=None`` with a ``lower`` no upper ones.
    ``stats.forward.extra["status"]`` holds each sample's :class:`QPStatus`, and
    ``stats.backward.extra["degenerate"]`` flags samples at degenerate points.

    >>> import torch, implicit_layers as il
    >>> Q = torch.eye(2, dtype=torch.float64); c = torch.tensor([-1., -1.], dtype=torch.float64)
    >>> G = torch.ones(1, 2, dtype=torch.float64); h = torch.ones(1, dtype=torch.float64)
    >>> x, lam, mu = il.QPLayer()(Q, c, None, None, G, h)
    >>> x.round(decimals=6), mu.round(decimals=6)
    (tensor([0.5000, 0.5000], dtype=torch.float64), tensor([0.5000], dtype=torch.float64))
    """

    def __init__(self, solver: QPSolver | None = None, on_failure: str = "raise",
                 infeasible: str = "raise"):
        solver = solver if solver is not None else InteriorPoint()
        if not isinstance(solver, QPSolver):
            raise ValueError(f"solver must be a QPSolver (InteriorPoint, OSQP), got {solver!r}")
        if infeasible not in ("raise", "closest"):
            raise ValueError(f"infeasible must be 'raise' or 'closest', got {infeasible!r}")
        super().__init__(qp_residual, solver, FactorizationAdjoint(),
                         on_failure=check_policy(on_failure))
        self.infeasible = infeasible

    @classmethod
    def from_cvxpy(cls, problem, parameters, variables, **kwargs):
        """Build a layer from a parametrized cvxpy QP; see :class:`CvxpyQPLayer`."""
        from implicit_layers.layers.qp.cvxpy import CvxpyQPLayer

        return CvxpyQPLayer(problem, parameters, variables, layer=cls(**kwargs))

    def forward(self, Q: Tensor, c: Tensor, A: Tensor | None = None, b: Tensor | None = None,
                G: Tensor | None = None, h: Tensor | None = None,
                lower: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        inputs = check_qp_inputs(Q, c, A, b, G, h, lower)
        n, p, m = c.shape[-1], inputs[2].shape[-2], inputs[4].shape[-2]
        return split(self._solve_qp(inputs)[..., :n + p + m], n, p)

    def _solve_qp(self, inputs: tuple[Tensor, ...], closest: bool = True) -> Tensor:
        """The implicit function on checked inputs ``(Q, c, A, b, G, lower, upper)``: the
        unknowns ``(x, λ, μ, σ)`` of :mod:`~implicit_layers.layers.qp.forward`; with
        ``infeasible="closest"`` (and ``closest``), infeasible samples solved again as their
        closest feasible QP."""
        Q, c, A, b, G, lower, upper = inputs
        inputs = (0.5 * (Q + Q.mT), c, A, b, G, lower, upper)
        n, p, m = c.shape[-1], A.shape[-2], G.shape[-2]
        batch = torch.broadcast_shapes(*(t.shape[: t.ndim - e] for t, e in zip(inputs, EVENT_NDIMS)))
        y0 = c.new_zeros(*batch, n + p + 2 * m)
        forward = QPForward(self.solver, self.infeasible if closest else "raise")
        y = self._solve(inputs, y0, solver=forward, residual=qp_residual, x_names=NAMES,
                        broadcasts=True, x_event_ndims=EVENT_NDIMS, sample_check=False,
                        check_inputs=False, input_pullback=qp_pullback)
        idx = forward.infeasible_samples
        if self.infeasible == "closest" and closest and idx is not None and idx.numel():
            y = resolve_closest(self, inputs, EVENT_NDIMS, y, idx)
        return y

    def extra_repr(self) -> str:
        return f"solver={self.solver!r}, on_failure={self.on_failure!r}, infeasible={self.infeasible!r}"


def check_qp_inputs(Q, c, A, b, G, h, lower) -> tuple[Tensor, ...]:
    """``(Q, c, A, b, G, lower, upper)`` with absent parts filled in (empty ``A``/``G``,
    infinite bounds), after checking shapes, dtypes and values; ``ValueError`` naming the
    argument otherwise. Bounds may be infinite on their own side (``h = +inf``,
    ``lower = −inf``), never NaN."""
    Q = check_tensor("Q", Q, min_ndim=2, finite=False)
    c = check_tensor("c", c, min_ndim=1, finite=False)
    n = Q.shape[-1]
    if Q.shape[-2] != n:
        raise ValueError(f"Q must be square (*, n, n), got shape {tuple(Q.shape)}")
    if c.shape[-1] != n:
        raise ValueError(f"c must have shape (*, {n}) to match Q, got {tuple(c.shape)}")
    if (A is None) != (b is None):
        raise ValueError("A and b must be given together (or both None)")
    if A is None:
        A, b = Q.new_zeros(0, n), Q.new_zeros(0)
    if G is None and (h is not None or lower is not None):
        raise ValueError("h or lower given without G")
    if G is not None and h is None and lower is None:
        raise ValueError("G given without h (or lower)")
    if G is None:
        G, h, lower = Q.new_zeros(0, n), Q.new_zeros(0), Q.new_zeros(0)
    A = check_tensor("A", A, min_ndim=2, finite=False)
    b = check_tensor("b", b, min_ndim=1, finite=False)
    G = check_tensor("G", G, min_ndim=2, finite=False)
    m = G.shape[-2]
    inf = torch.tensor(float("inf"), dtype=Q.dtype, device=Q.device)
    h = inf.expand(m) if h is None else check_tensor("h", h, min_ndim=1, finite=False)
    lower = (-inf).expand(m) if lower is None else check_tensor("lower", lower, min_ndim=1,
                                                                  finite=False)
    for mat, name in ((A, "A"), (G, "G")):
        if mat.shape[-1] != n:
            raise ValueError(f"{name} must have {n} columns to match Q, got shape {tuple(mat.shape)}")
    for vec, name, rows, of in ((b, "b", A.shape[-2], "A"), (h, "h", m, "G"), (lower, "lower", m, "G")):
        if vec.shape[-1] != rows:
            raise ValueError(f"{name} must have shape (*, {rows}) to match {of}, got {tuple(vec.shape)}")
    named = dict(zip(NAMES, (Q, c, A, b, G, lower, h), strict=True))
    check_same_dtype_device(named)
    shapes = {k: t.shape[: t.ndim - e] for (k, t), e in zip(named.items(), EVENT_NDIMS, strict=True)}
    try:
        torch.broadcast_shapes(*shapes.values())
    except RuntimeError as err:
        listed = ", ".join(f"{k} {tuple(v)}" for k, v in shapes.items())
        raise ValueError(f"batch dims do not broadcast: {listed}") from err
    for name in ("Q", "c", "A", "b", "G"):
        check_tensor(name, named[name])
    for name, bad in (("h", -inf), ("lower", inf)):
        t = named[name]
        if not t.numel() or is_wrapped(t):
            continue
        if bool(torch.isnan(t).any()):
            raise ValueError(f"{name} contains NaN")
        if bool((t == bad).any()):
            raise ValueError(f"{name} contains {float(bad)}: that bound can never hold")
    if m and not is_wrapped(lower) and not is_wrapped(h) and bool((lower > h).any()):
        raise ValueError(f"lower exceeds h in {int((lower > h).sum())} entries: an empty interval "
                         f"(infeasible constraints are fine; crossed bounds are malformed input)")
    return Q, c, A, b, G, lower, h
