"""Issue 12, observations 1-2 and the gradient contract, on every QP backend, in reverse mode
(autograd) and forward mode (``torch.func.jvp``).

Contract (solvers/qp/active_set.py): where x is locally unique the gradient is exact, even
with a singular Q or non-unique multipliers; where the derivative system is singular or a
constraint is weakly active the gradient is finite and the sample is flagged
``stats.backward.extra["degenerate"]``; a SOLVED sample never gets an all-zero gradient; a
failed sample under ``on_failure="warn"`` gets exactly zero gradient.
"""

import warnings

import pytest
import torch

import implicit_layers as il
from tests.layers.qp_backends import BACKENDS, make
from tests.layers.qp_fixtures import one_thread  # noqa: F401 (autouse fixture)

f64 = dict(dtype=torch.float64)
SOLVED = il.QPStatus.SOLVED


def t(*values):
    return torch.tensor(values, **f64)


def reverse_and_forward(layer, make_args, theta, out, tangent):
    """``(∂out/∂θ · tangent by autograd, the same by torch.func.jvp, the layer's stats after
    the backward)``; ``make_args(θ)`` builds the layer's positional and keyword inputs."""
    theta = theta.clone().requires_grad_()
    args, kwargs = make_args(theta)
    y = layer(*args, **kwargs)
    (g,) = torch.autograd.grad(out(y), theta)
    stats = layer.stats

    def f(th):
        a, kw = make_args(th)
        return out(layer(*a, **kw))

    _, jvp = torch.func.jvp(f, (theta.detach(),), (tangent,))
    return (g * tangent).sum(), jvp, stats


# --- observation 1: the lasso as a QP (singular Q, unique x) --------------------------------


def lasso(b):
    """Variables (x, t, y): min ½y² + t s.t. x − y = b, −t ≤ x ≤ t; at b = 3, (x, t, y) =
    (2, 2, −1) and x = b − 1 near there: dx/db = 1."""
    Q = torch.diag(t(0.0, 0.0, 1.0))
    G = t(1.0, -1.0, 0.0, -1.0, -1.0, 0.0).reshape(2, 3)
    return (Q, t(0.0, 1.0, 0.0), t(1.0, 0.0, -1.0).reshape(1, 3), b.reshape(1), G,
            torch.zeros(2, **f64)), {}


@pytest.mark.parametrize("backend", BACKENDS)
def test_lasso_singular_Q_gradient_is_one(backend):
    layer = make(backend)
    b = t(3.0)
    d_rev, d_fwd, stats = reverse_and_forward(layer, lasso, b, lambda y: y[0][0], torch.ones_like(b))
    x = layer(*lasso(b)[0])[0]
    torch.testing.assert_close(x, t(2.0, 2.0, -1.0), atol=1e-9, rtol=0)
    assert int(layer.stats.forward.extra["status"]) == SOLVED
    torch.testing.assert_close(d_rev, t(1.0)[0], atol=1e-8, rtol=0)
    torch.testing.assert_close(d_fwd, t(1.0)[0], atol=1e-8, rtol=0)
    assert not bool(stats.backward.extra["degenerate"])  # x is locally unique, K nonsingular


# --- observation 2: duplicated active constraint, dependent equality rows -------------------


def duplicated(c):
    """Q = I, G = [[1, 1], [1, 1]], h = (1, 1): x = (0, 1), dx₀/dc = (−½, ½); μ not unique."""
    return (torch.eye(2, **f64), c, None, None, torch.ones(2, 2, **f64), torch.ones(2, **f64)), {}


def dependent_rows(c):
    """The same projection with the constraint as two identical equality rows."""
    return (torch.eye(2, **f64), c, torch.ones(2, 2, **f64), torch.ones(2, **f64)), {}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("problem", [duplicated, dependent_rows])
def test_dependent_active_constraints_give_the_exact_gradient(backend, problem):
    layer = make(backend)
    c = t(-1.0, -2.0)
    for tangent, want in ((t(1.0, 0.0), -0.5), (t(0.0, 1.0), 0.5)):
        d_rev, d_fwd, stats = reverse_and_forward(layer, problem, c, lambda y: y[0][0], tangent)
        torch.testing.assert_close(d_rev, t(want)[0], atol=1e-8, rtol=0)
        torch.testing.assert_close(d_fwd, t(want)[0], atol=1e-8, rtol=0)
        assert bool(stats.backward.extra["degenerate"])  # K is singular: flagged
    x = layer(*problem(c)[0])[0]
    torch.testing.assert_close(x, t(0.0, 1.0), atol=1e-9, rtol=0)
    assert int(layer.stats.forward.extra["status"]) == SOLVED


@pytest.mark.parametrize("backend", BACKENDS)
def test_duplicated_constraint_bound_gradient_is_finite_and_consistent(backend):
    # x depends on min(h₁, h₂): not differentiable in h₁ alone, but along h₁ = h₂ it is, with
    # dx₀/ds = ½ for h = (s, s). Any defined choice of h̄ must add up to that.
    layer = make(backend)
    h = torch.ones(2, **f64)

    def args(h_):
        return (torch.eye(2, **f64), t(-1.0, -2.0), None, None, torch.ones(2, 2, **f64), h_), {}

    d_rev, d_fwd, stats = reverse_and_forward(layer, args, h, lambda y: y[0][0], torch.ones_like(h))
    torch.testing.assert_close(d_rev, t(0.5)[0], atol=1e-8, rtol=0)
    torch.testing.assert_close(d_fwd, t(0.5)[0], atol=1e-8, rtol=0)
    assert bool(stats.backward.extra["degenerate"])
    _, one_sided, _ = reverse_and_forward(layer, args, h, lambda y: y[0][0], t(1.0, 0.0))
    assert bool(torch.isfinite(one_sided))


@pytest.mark.xfail(strict=True, raises=il.SingularSystemError,
                   reason="EqualityQPLayer raises SingularSystemError for dependent consistent "
                          "rows (dense LDLᵀ diagnosis) instead of the exact gradient (−½, ½)")
@pytest.mark.parametrize("backend", ["dense", "osqp"])
def test_equality_qp_layer_dependent_rows_gradient(backend):
    layer = il.EqualityQPLayer(backend=backend)
    c = t(-1.0, -2.0)
    d_rev, d_fwd, _ = reverse_and_forward(layer, dependent_rows, c, lambda y: y[0][0], t(1.0, 0.0))
    torch.testing.assert_close(d_rev, t(-0.5)[0], atol=1e-8, rtol=0)
    torch.testing.assert_close(d_fwd, t(-0.5)[0], atol=1e-8, rtol=0)


# --- the contract at degenerate points ------------------------------------------------------


def weakly_active(h):
    """min ½‖x‖² − 2x₁ s.t. x₁ ≤ h₁, x₂ ≤ h₂ at h = (1, 0): x = (1, 0), μ = (1, 0): the
    second constraint is active with a zero multiplier (dx₂/dh₂ is 1 from below, 0 above)."""
    return (torch.eye(2, **f64), t(-2.0, 0.0), None, None, torch.eye(2, **f64), h), {}


@pytest.mark.parametrize("backend", BACKENDS)
def test_weakly_active_constraint_is_flagged_with_a_finite_one_sided_gradient(backend):
    layer = make(backend)
    h = t(1.0, 0.0)
    for tangent, bounds in ((t(0.0, 1.0), (0.0, 1.0)), (t(1.0, 0.0), (0.0, 0.0))):
        d_rev, d_fwd, stats = reverse_and_forward(layer, weakly_active, h, lambda y: y[0][1], tangent)
        for d in (d_rev, d_fwd):
            assert bool(torch.isfinite(d)) and bounds[0] - 1e-6 <= float(d) <= bounds[1] + 1e-6
        assert bool(stats.backward.extra["degenerate"])
    # the derivative of x₁ in h₁ is unaffected by the kink in h₂
    d_rev, d_fwd, _ = reverse_and_forward(layer, weakly_active, h, lambda y: y[0][0], t(1.0, 0.0))
    torch.testing.assert_close(torch.stack([d_rev, d_fwd]), t(1.0, 1.0), atol=1e-6, rtol=0)


def degenerate_lp_vertex(h):
    """min −x₁ − x₂ s.t. x₁ ≤ 1, x₂ ≤ 1, x₁ + x₂ ≤ 2, x ≥ 0: three constraints active at the
    optimal vertex (1, 1) of a 2-D LP: the active rows are dependent, K is singular."""
    G = t(1.0, 0.0, 0.0, 1.0, 1.0, 1.0, -1.0, 0.0, 0.0, -1.0).reshape(5, 2)
    return (torch.zeros(2, 2, **f64), t(-1.0, -1.0), None, None, G, h), {}


@pytest.mark.parametrize("backend", BACKENDS)
def test_lp_degenerate_vertex_is_flagged_with_finite_gradient(backend):
    layer = make(backend)
    h = t(1.0, 1.0, 2.0, 0.0, 0.0)
    x = layer(*degenerate_lp_vertex(h)[0])[0]
    torch.testing.assert_close(x, t(1.0, 1.0), atol=1e-8, rtol=0)
    assert int(layer.stats.forward.extra["status"]) == SOLVED
    # raising h₁ and h₃ together moves x₁ one for one (x₁ = min(h₁, h₃ − x₂)): exact there
    d_rev, d_fwd, stats = reverse_and_forward(layer, degenerate_lp_vertex, h, lambda y: y[0][0],
                                              t(1.0, 0.0, 1.0, 0.0, 0.0))
    assert bool(stats.backward.extra["degenerate"])
    for d in (d_rev, d_fwd):
        assert bool(torch.isfinite(d))
        torch.testing.assert_close(d, t(1.0)[0], atol=1e-6, rtol=0)


def test_solved_samples_never_get_zero_gradients_failed_ones_exactly_zero():
    # a batch of the reproducers above (all SOLVED) plus an infeasible sample (x₁ ≤ −1 and
    # x₁ ≥ 1): every solved sample has a nonzero gradient, the failed one exactly zero
    Q = torch.stack([torch.eye(2, **f64)] * 3 + [torch.zeros(2, 2, **f64)])
    c = torch.stack([t(-1.0, -2.0), t(-2.0, 0.0), t(-1.0, -2.0), t(-1.0, -1.0)])
    G = torch.stack([torch.ones(2, 2, **f64), torch.eye(2, **f64),
                     t(1.0, 0.0, -1.0, 0.0).reshape(2, 2), t(1.0, 0.0, 0.0, 1.0).reshape(2, 2)])
    h = torch.stack([torch.ones(2, **f64), t(1.0, 0.0), t(-1.0, -1.0), t(1.0, 1.0)])
    for backend in BACKENDS:
        args = [v.clone().requires_grad_() for v in (Q, c, G, h)]
        layer = make(backend, on_failure="warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            x, _, mu = layer(args[0], args[1], None, None, args[2], args[3])
        assert any(issubclass(w.category, il.ConvergenceWarning) for w in caught)
        status = layer.stats.forward.extra["status"]
        assert status.tolist() == [SOLVED, SOLVED, il.QPStatus.INFEASIBLE, SOLVED], backend
        (x.sum() + mu.sum()).backward()
        per_sample = torch.stack([a.grad.flatten(1).abs().amax(1) for a in args]).amax(0)
        assert bool(torch.isfinite(per_sample).all())
        assert float(per_sample[2]) == 0.0, backend
        assert bool((per_sample[[0, 1, 3]] > 0).all()), (backend, per_sample)
