"""The forward solvers at the edges (issue 13): overflow never counts as convergence, norms
that do not overflow, 0-d unknowns, empty batches, parameter validation, and one device read
per iteration."""

import warnings

import pytest
import torch
from torch.overrides import TorchFunctionMode

import implicit_layers as il
from implicit_layers import functional as F
from implicit_layers.solvers import anderson
from implicit_layers.solvers.base import RootProblem, safe_norm

D64 = torch.float64
ROOT_SOLVERS = {"newton": il.Newton, "broyden": il.Broyden, "scipy": il.ScipyRoot,
                "anderson": il.Anderson, "picard": il.Picard}


@pytest.mark.parametrize("solver", [il.Picard(), il.Anderson()], ids=repr)
@pytest.mark.parametrize("dtype", [torch.float32, D64])
def test_an_overflowing_map_is_never_converged(solver, dtype):
    """z ↦ 1e30 z + x grows without bound: the iterates overflow (float32 at once, float64
    after ~10 steps, where the unscaled norms overflowed first and passed inf ≤ inf)."""
    one = torch.ones(2, 3, dtype=dtype)
    with pytest.raises(il.ConvergenceError, match="non-finite residual"):
        F.fixed_point(lambda x, z: z * 1e30 + x, one, one, solver=solver)


@pytest.mark.parametrize("name", ROOT_SOLVERS)
def test_a_start_whose_plain_norm_overflows_is_not_converged(name):
    """y0 = 1e300 is far from the root x of 0.5 (x − y); ‖y0‖² overflows float64, and with
    plain norms the test ‖f‖ ≤ rtol·‖y‖ read inf ≤ inf at the start. Newton-type solvers
    reach the root of this linear residual in a step; fixed-point iterations need hundreds of
    halvings, and with a budget of 5 they report failure."""
    x = torch.tensor([[1.0, 2.0, 3.0]], dtype=D64)
    y0 = torch.full((1, 3), 1e300, dtype=D64)
    residual = lambda x, y: 0.5 * (x - y)  # noqa: E731
    if name in ("anderson", "picard"):
        with pytest.raises(il.ConvergenceError, match="did not converge"):
            F.root_find(residual, x, y0, solver=ROOT_SOLVERS[name](max_iter=5))
    else:
        y = F.root_find(residual, x, y0, solver=ROOT_SOLVERS[name]())
        torch.testing.assert_close(y, x, rtol=1e-9, atol=0)


@pytest.mark.parametrize("scale", [1e-200, 1.0, 1e200])
def test_anderson_iterates_identically_at_extreme_scales(scale):
    """c·g(y/c) from c·y0: norms and the Gram matrix are scaled per sample, so neither
    overflows nor underflows and the iterates are the unscaled ones times c."""
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(6, 6, generator=gen, dtype=D64)
    W = 0.9 * W / torch.linalg.matrix_norm(W, 2)
    b = torch.randn(3, 6, generator=gen, dtype=D64)
    g = lambda z: scale * torch.tanh(z / scale @ W.T + b)  # noqa: E731
    solver = il.Anderson(m=4, tol=0.0, rtol=1e-11)
    res = solver.solve(RootProblem(lambda z: g(z) - z, fixed_point_map=g),
                       torch.zeros(3, 6, dtype=D64))
    ref = solver.solve(RootProblem(lambda z: torch.tanh(z @ W.T + b) - z), torch.zeros(3, 6,
                                                                                  dtype=D64))
    assert res.stats.all_converged
    torch.testing.assert_close(res.y / scale, ref.y, rtol=1e-9, atol=1e-12)
    assert torch.equal(res.stats.iterations, ref.stats.iterations)


def test_safe_norm_is_exact_where_squares_overflow_or_underflow():
    for dtype, big, small in ((torch.float32, 1e30, 1e-30), (D64, 1e300, 1e-300)):
        t = torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=dtype)
        for s in (big, small):
            torch.testing.assert_close(safe_norm(t * s), torch.tensor([5 * s, 0.0], dtype=dtype))
    nan_inf = torch.tensor([[1.0, float("nan")], [1.0, float("inf")]])
    out = safe_norm(nan_inf)
    assert out[0].isnan() and not out[1].isfinite()


def test_a_nan_residual_in_one_sample_stops_the_solve():
    def g(z):
        out = 0.5 * z + 1.0
        out[1] = float("nan")
        return out

    prob = RootProblem(lambda z: g(z) - z, fixed_point_map=g)
    for solver in (il.Picard(), il.Anderson()):
        with pytest.raises(il.ConvergenceError, match="non-finite residual at the initial"):
            solver.solve(prob, torch.zeros(2, 3, dtype=D64))


def test_zero_dimensional_unknowns():
    """event_ndim=0 with a 0-d y: v = v/2 + x (v = 2x), and y³ = x (y = ∛x) with Newton and
    Broyden (and Picard, SciPy), values and gradients."""
    x = torch.tensor(0.5, dtype=D64, requires_grad=True)
    v = F.fixed_point(lambda x, v: 0.5 * v + x, x, torch.tensor(0.0, dtype=D64), event_ndim=0)
    assert v.shape == () and abs(float(v.detach()) - 1.0) < 1e-10
    assert abs(float(torch.autograd.grad(v, x)[0]) - 2.0) < 1e-8
    p = torch.tensor(8.0, dtype=D64, requires_grad=True)
    for solver in (il.Newton(), il.Broyden(), il.Picard(), il.ScipyRoot()):
        y = F.root_find(lambda p, y: (p - y**3) / 12, p, torch.tensor(1.5, dtype=D64),
                        solver=solver, event_ndim=0,
                        adjoint=il.DirectAdjoint())
        assert y.shape == () and abs(float(y.detach()) - 2.0) < 1e-9, solver
        assert abs(float(torch.autograd.grad(y, p)[0]) - 1 / 12) < 1e-9  # dy/dp = 1 / (3 y²)


@pytest.mark.parametrize("name", ROOT_SOLVERS)
def test_empty_batch_returns_empty_outputs_and_gradients(name):
    x = torch.zeros(0, 3, dtype=D64, requires_grad=True)
    y = F.root_find(lambda x, y: 0.5 * torch.tanh(y) + x - y, x, torch.zeros(0, 3, dtype=D64),
                    solver=ROOT_SOLVERS[name]())
    assert y.shape == (0, 3)
    (grad,) = torch.autograd.grad(y.sum(), x)
    assert grad.shape == (0, 3)


def test_empty_batch_through_a_deq_layer():
    cell = torch.nn.Linear(3, 3)
    deq = il.DEQLayer(lambda x, z: torch.tanh(0.5 * cell(z)) + x)
    x = torch.zeros(0, 3, requires_grad=True)
    z = deq(x)
    z.sum().backward()
    assert z.shape == (0, 3) and x.grad.shape == (0, 3)
    assert deq.stats.forward.iterations.shape == (0,)


def test_scipy_root_with_no_budget_does_not_call_scipy():
    prob = RootProblem(lambda y: y**3 - 8.0)
    res = il.ScipyRoot(max_iter=0).solve(prob, torch.ones(1, dtype=D64))
    assert float(res.y) == 1.0 and not res.stats.all_converged
    assert res.stats.evaluations == 1
    at_root = il.ScipyRoot(max_iter=0).solve(prob, torch.full((1,), 2.0, dtype=D64))
    assert at_root.stats.all_converged


@pytest.mark.parametrize("name", ROOT_SOLVERS)
@pytest.mark.parametrize("kwargs", [{"tol": -1.0}, {"tol": float("nan")}, {"tol": float("inf")},
                                    {"rtol": -1e-3}, {"max_iter": -1}, {"max_iter": 2.5},
                                    {"max_iter": True}])
def test_solver_parameters_are_validated_at_construction(name, kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        ROOT_SOLVERS[name](**kwargs)


def test_functional_budget_is_validated():
    x = torch.ones(1, 2, dtype=D64)
    with pytest.raises(ValueError, match="tol"):
        F.fixed_point(lambda x, z: 0.5 * z + x, x, x, tol=-1.0)
    with pytest.raises(ValueError, match="max_iter"):
        F.root_find(lambda x, y: y - x, x, x, max_iter=-3)


@pytest.mark.parametrize("kwargs", [{"max_backtracks": -1}, {"armijo": 0.0}, {"armijo": 0.7}])
def test_newton_line_search_parameters_are_validated(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        il.Newton(**kwargs)


@pytest.mark.parametrize("solver", [il.Anderson(), il.Picard(), il.Broyden(init="identity")],
                         ids=repr)
def test_a_deq_cell_of_the_wrong_shape_is_a_value_error(solver):
    deq = il.DEQLayer(lambda x, z: z[..., :2], solver=solver)
    with pytest.raises(ValueError, match=r"shape \(4, 2\)"):
        deq(torch.zeros(4, 3))


class HostReads(TorchFunctionMode):
    """Counts reads of tensor values by the host (each one a synchronization on a GPU)."""

    READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy",
             "__array__", "cpu"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += getattr(func, "__name__", "") in self.READS
        return func(*args, **(kwargs or {}))


def _tanh_problem(n=16, B=8):
    gen = torch.Generator().manual_seed(3)
    W = torch.randn(n, n, generator=gen)
    W = 0.9 * W / torch.linalg.matrix_norm(W, 2)
    x = torch.randn(B, n, generator=gen)
    g = lambda z: torch.tanh(z @ W.T + x)  # noqa: E731
    return RootProblem(lambda z: g(z) - z, fixed_point_map=g), torch.zeros(B, n)


@pytest.mark.parametrize("solver", [il.Anderson(m=4, tol=1e-6), il.Picard(tol=1e-6),
                                    il.Broyden(init="identity", tol=1e-6)], ids=repr)
def test_one_host_read_per_iteration(solver, monkeypatch):
    """The per-iteration loop reads one value from the device: the stopping test. Anderson's
    small systems are solved by NumPy on CPU tensors; the count uses the torch path that GPU
    tensors take (no host read), forced here."""
    monkeypatch.setattr(anderson, "_solve_on_host", lambda t: False)
    prob, z0 = _tanh_problem()
    with HostReads() as reads:
        res = solver.solve(prob, z0)
    iterations = int(res.stats.iterations.max())
    assert res.stats.all_converged and iterations >= 5
    assert reads.count == iterations + 1  # the check of the initial guess, then one each


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_one_cuda_synchronization_per_anderson_iteration():
    gen = torch.Generator().manual_seed(3)
    W = (0.5 * torch.randn(16, 16, generator=gen) / 4).cuda()
    x = torch.randn(8, 16, generator=gen).cuda()
    g = lambda z: torch.tanh(z @ W.T + x)  # noqa: E731
    cuda_prob = RootProblem(lambda z: g(z) - z, fixed_point_map=g)
    solver = il.Anderson(m=4, tol=1e-6)
    solver.solve(cuda_prob, torch.zeros(8, 16, device="cuda"))  # warm up
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = solver.solve(cuda_prob, torch.zeros(8, 16, device="cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = sum("synchroniz" in str(w.message) for w in caught)
    assert syncs <= int(res.stats.iterations.max()) + 1
