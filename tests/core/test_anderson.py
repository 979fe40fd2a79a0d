"""Anderson acceleration: accuracy, speed-up over Picard, scale invariance, per-sample
stopping, breakdown safeguard and failure reporting."""

import pytest
import torch

from implicit_layers.errors import ConvergenceError
from implicit_layers.solvers.anderson import Anderson, _History, _mixing_coefficients
from implicit_layers.solvers.base import RootProblem
from implicit_layers.solvers.picard import Picard

D64 = torch.float64


def linear_problem(B=3, n=6, rho=0.9, seed=0, dtype=D64):
    """g(z) = A z + b with symmetric A of spectral radius rho; solution (I − A)⁻¹ b."""
    gen = torch.Generator().manual_seed(seed)
    M = torch.randn(B, n, n, generator=gen, dtype=dtype)
    S = M + M.mT
    S = S / torch.linalg.eigvalsh(S).abs().amax(-1)[:, None, None]
    A, b = rho * S, torch.randn(B, n, generator=gen, dtype=dtype)
    g = lambda z: (A @ z.unsqueeze(-1)).squeeze(-1) + b  # noqa: E731
    z_star = torch.linalg.solve(torch.eye(n, dtype=dtype) - A, b)
    return RootProblem(lambda z: g(z) - z, fixed_point_map=g), z_star


def tanh_problem(B=4, n=8, rho=0.95, seed=1, dtype=D64):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(n, n, generator=gen, dtype=dtype)
    W = rho * W / torch.linalg.matrix_norm(W, 2)
    x = torch.randn(B, n, generator=gen, dtype=dtype)
    g = lambda z: torch.tanh(z @ W.T + x)  # noqa: E731
    return RootProblem(lambda z: g(z) - z, fixed_point_map=g)


def test_cos_fixed_point_scalar_events():
    prob = RootProblem(lambda y: torch.cos(y) - y, event_ndim=0)
    res = Anderson(m=3).solve(prob, torch.zeros(5, dtype=D64))
    assert res.y.shape == (5,)
    expected = torch.full((5,), 0.7390851332151607, dtype=D64)
    torch.testing.assert_close(res.y, expected, atol=1e-10, rtol=0)
    assert res.stats.all_converged


def test_linear_problem_matches_direct_solve_and_beats_picard():
    prob, z_star = linear_problem(rho=0.99)
    res = Anderson(m=6, max_iter=200).solve(prob, torch.zeros_like(z_star))
    torch.testing.assert_close(res.y, z_star, atol=1e-9, rtol=1e-9)
    picard = Picard(max_iter=5000).solve(prob, torch.zeros_like(z_star))
    assert res.stats.all_converged and picard.stats.all_converged
    assert int(res.stats.iterations.max()) * 10 < int(picard.stats.iterations.max())
    assert res.stats.evaluations == int(res.stats.iterations.max()) + 1


def test_stats_trace_and_event_dims():
    prob = RootProblem(lambda y: 0.5 * torch.sin(y) + 0.1 - y, event_ndim=2)
    y0 = torch.zeros(2, 3, 4, dtype=D64)
    res = Anderson().solve(prob, y0)
    st = res.stats
    assert res.y.shape == y0.shape and st.iterations.shape == (2,)
    assert st.trace.shape == (int(st.iterations.max()) + 1, 2)
    torch.testing.assert_close(st.trace[-1], st.residual)
    torch.testing.assert_close(prob.norm(prob.residual(res.y)), st.residual)
    assert st.extra["restarts"].shape == (2,) and st.extra["memory"] == 5


def test_scale_invariance():
    """Solving c·g(y/c) from c·y0 follows the same iterates scaled by c."""
    prob = tanh_problem()
    y0 = torch.zeros(4, 8, dtype=D64)
    solver = Anderson(m=4, tol=0.0, rtol=1e-10)
    base = solver.solve(prob, y0)
    for c in (1e-6, 1e6):
        g = lambda z, c=c: c * prob.g(z / c)  # noqa: E731
        scaled = solver.solve(RootProblem(lambda z, g=g: g(z) - z, fixed_point_map=g), y0)
        torch.testing.assert_close(scaled.y / c, base.y, atol=1e-11, rtol=1e-9)
        assert torch.equal(scaled.stats.iterations, base.stats.iterations)


def test_per_sample_stopping_freezes_converged_samples():
    prob, z_star = linear_problem(B=1, rho=0.3, seed=3)
    hard, z_hard = linear_problem(B=1, rho=0.995, seed=4)
    g = lambda z: torch.cat([prob.g(z[:1]), hard.g(z[1:])])  # noqa: E731
    mixed = RootProblem(lambda z: g(z) - z, fixed_point_map=g)
    res = Anderson(m=3, max_iter=300).solve(mixed, torch.zeros(2, 6, dtype=D64))
    it = res.stats.iterations
    assert it[0] < it[1]
    alone = Anderson(m=3, max_iter=300).solve(prob, torch.zeros(1, 6, dtype=D64))
    assert torch.equal(res.y[0], alone.y[0])  # frozen exactly where it converged alone
    torch.testing.assert_close(res.y[1], z_hard[0], atol=1e-9, rtol=1e-9)


def test_float32():
    prob = tanh_problem(dtype=torch.float32)
    res = Anderson().solve(prob, torch.zeros(4, 8))
    assert res.stats.all_converged and res.y.dtype == torch.float32
    assert float(prob.norm(prob.residual(res.y)).max()) < 1e-4


def _history(B=2, n=3, m=2, lam=1e-8):
    res0 = torch.ones(B, dtype=D64)  # unit initial residuals: ΔF is stored unscaled
    return _History(B, n, m, lam, res0, D64)


def test_dependent_differences_give_the_regularized_least_squares_solution():
    """Two identical residual differences c (a singular Gram matrix): the regularized problem
    min ‖r − ΔF γ‖² + λ s ‖γ‖² (s = ‖c‖²) has the symmetric solution γ₁ = γ₂ = ⟨c, r⟩ / ((2 + λ)
    ‖c‖²), half the projection of r onto c each."""
    hist = _history()
    c = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]], dtype=D64)
    f = torch.tensor([[1.0, 1.0, 1.0], [2.0, 0.0, 1.0]], dtype=D64)
    zero = torch.zeros(2, 3, dtype=D64)
    hist.push(c, zero, zero, zero, reset=None)
    hist.push(c + f, f, zero, zero, reset=None)  # Δf = c again; newest residual f + c
    gamma, broken = hist.coefficients()
    assert broken is None
    r = f + c
    expected = ((c * r).sum(-1) / (c * c).sum(-1) / (2 + 1e-8)).unsqueeze(-1).expand(2, 2)
    torch.testing.assert_close(gamma, expected, rtol=1e-7, atol=0)


def test_gram_matrix_is_updated_incrementally():
    """After more pushes than the memory holds, the stored Gram matrix and right-hand side
    equal ΔFᵀΔF and ΔFᵀf recomputed from the buffer."""
    gen = torch.Generator().manual_seed(0)
    hist = _History(3, 7, 4, 1e-8, torch.full((3,), 2.0, dtype=D64), D64)
    fs = [torch.randn(3, 7, generator=gen, dtype=D64) for _ in range(11)]
    for i in range(10):
        hist.push(fs[i + 1], fs[i], fs[i + 1], fs[i], reset=None)
    dF = torch.stack([fs[i + 1] - fs[i] for i in range(6, 10)], 1) / 2  # scaled by 1/‖f0‖
    order = [(i + 2) % 4 for i in range(4)]  # circular buffer: slots of pushes 7..10
    torch.testing.assert_close(hist.dF[:, order], dF)
    torch.testing.assert_close(hist.gram, hist.dF @ hist.dF.mT)
    torch.testing.assert_close(hist.rhs, (hist.dF @ fs[10].unsqueeze(-1)).squeeze(-1) / 2)


def test_non_finite_normal_equations_restart_only_that_sample():
    """An overflowing Gram matrix (inf) breaks one sample down: it gets γ = 0 (a Picard step)
    and its older columns are dropped at the next push; the other sample is untouched."""
    hist = _history(m=3)
    zero = torch.zeros(2, 3, dtype=D64)
    gen = torch.Generator().manual_seed(1)
    df = torch.randn(2, 3, generator=gen, dtype=D64)
    hist.push(df, zero, zero, zero, reset=None)
    hist.push(2 * df + 1, df, zero, zero, reset=None)
    hist.gram[0, 0, 0] = float("inf")
    gamma, broken = hist.coefficients()
    assert broken.tolist() == [True, False]
    assert torch.equal(gamma[0], torch.zeros(3, dtype=D64)) and bool(gamma[1].abs().sum() > 0)
    hist.push(-df, zero, zero, zero, reset=broken)
    assert hist.valid.tolist() == [[0.0, 0.0, 1.0], [1.0, 1.0, 1.0]]
    assert torch.equal(hist.gram[0, :2], torch.zeros(2, 3, dtype=D64))
    gamma, broken = hist.coefficients()
    assert broken is None and torch.equal(gamma[0, :2], torch.zeros(2, dtype=D64))


def test_mixing_coefficients_numpy_and_torch_paths_agree():
    """The CPU path (NumPy) and the CUDA path (torch Cholesky) solve the same systems."""
    gen = torch.Generator().manual_seed(2)
    X = torch.randn(5, 4, 9, generator=gen, dtype=D64)
    gram, rhs = X @ X.mT, torch.randn(5, 4, generator=gen, dtype=D64)
    count, eye = torch.full((5, 1), 4.0, dtype=D64), torch.eye(4, dtype=D64)
    g_np, ok_np = _mixing_coefficients(gram.numpy(), rhs.numpy(), count.numpy(), eye.numpy(), 1e-6)
    g_t, ok_t = _mixing_coefficients(gram, rhs, count, eye, 1e-6)
    torch.testing.assert_close(torch.from_numpy(g_np), g_t, rtol=1e-10, atol=1e-12)
    assert ok_np.all() and bool(ok_t.all())
    expected = torch.linalg.solve(gram + 1e-6 * gram.diagonal(0, -2, -1).mean(-1)[:, None, None]
                                  * eye, rhs)
    torch.testing.assert_close(g_t, expected, rtol=1e-10, atol=1e-12)


def test_unregularized_solve_on_a_one_dimensional_problem_converges():
    """Regularization 0 on a 1-d problem (every Gram matrix of rank one): the floored λ keeps
    each step defined and the solve converges to the fixed point of cos."""
    prob = RootProblem(lambda y: torch.cos(y) - y, event_ndim=1)
    res = Anderson(m=4, regularization=0.0).solve(prob, torch.zeros(3, 1, dtype=D64))
    assert res.stats.all_converged
    torch.testing.assert_close(res.y, torch.full((3, 1), 0.7390851332151607, dtype=D64))


def test_overflowing_gram_matrix_restarts_and_still_converges():
    """float32 residuals near 1e30 make ⟨Δf, Δf⟩ overflow only if ΔF were stored unscaled;
    with the per-sample scaling the solve stays accelerated and converges."""
    g = lambda y: 0.5 * y + 1.0  # noqa: E731
    prob = RootProblem(lambda y: g(y) - y, fixed_point_map=g)
    res = Anderson(m=3, max_iter=30).solve(prob, torch.full((2, 4), 1e30))
    assert res.stats.all_converged
    torch.testing.assert_close(res.y, torch.full((2, 4), 2.0))
    assert int(res.stats.extra["restarts"].sum()) == 0


def test_non_convergence_is_reported_not_raised():
    prob, z_star = linear_problem(rho=0.999)
    res = Anderson(m=1, max_iter=3).solve(prob, torch.zeros_like(z_star))
    assert not res.stats.all_converged
    assert int(res.stats.iterations.max()) == 3


def test_non_finite_iterates_stop_the_solve():
    calls = []

    def blows_up_at_third_call(y):
        calls.append(1)
        return 0.5 * y + 1.0 if len(calls) < 3 else y + float("inf")

    g = blows_up_at_third_call
    prob = RootProblem(lambda y: g(y) - y, fixed_point_map=g)
    with pytest.raises(ConvergenceError, match="non-finite residual at iteration 2"):
        Anderson(tol=0.0, rtol=0.0).solve(prob, torch.zeros(2, 2, dtype=D64))
    nan_prob = RootProblem(lambda y: y * float("nan"))
    with pytest.raises(ConvergenceError, match="non-finite residual at the initial guess"):
        Anderson().solve(nan_prob, torch.ones(2, 2, dtype=D64))


@pytest.mark.parametrize("kwargs", [{"m": 0}, {"m": 2.5}, {"damping": 0.0}, {"damping": 1.5},
                                    {"regularization": -1.0}])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        Anderson(**kwargs)


def test_damping_still_converges():
    prob, z_star = linear_problem(rho=0.9)
    res = Anderson(damping=0.5).solve(prob, torch.zeros_like(z_star))
    torch.testing.assert_close(res.y, z_star, atol=1e-9, rtol=1e-9)
