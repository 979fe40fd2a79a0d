"""Issue 12, item 4: float32 gradients of QPLayer against float64, on every backend.

B = 8 strictly convex random QPs, n = 40, 40 inequalities with about half active; the
float64 reference solves the same (float32-rounded) data, so only the computation's
precision differs. Target: median relative gradient error ≤ 1e-3, worst ≤ 1e-2, in reverse
and forward mode. (The floor of an exact float32 active-set solve, and these errors, are
printed by ``python -m experiments.bench qp_float32``.)
"""

import pytest
import torch

import implicit_layers as il
from implicit_layers.solvers.qp.active_set import optimality_residual
from implicit_layers.solvers.qp.problem import QPProblem
from implicit_layers.testing.qp_float32 import (
    float32_problems,
    layer_gradients,
    layer_tangents,
    reference_gradients,
    relative,
)
from tests.layers.qp_backends import BACKENDS, make
from tests.layers.qp_fixtures import one_thread  # noqa: F401 (autouse fixture)

CASES = {**{k: {} for k in BACKENDS}, "ip-float32-iterations": {"dtype": None}}


@pytest.fixture(scope="module")
def problems():
    data32, data64, x_bar32, x_bar64 = float32_problems(batch=8, n=40, m=40, seed=0)
    exact = il.QPLayer(solver=il.InteriorPoint(tol=1e-12))
    reference = reference_gradients(data64, x_bar64, exact)
    # the float64 layer itself matches the independent active-set reference
    assert float(relative(layer_gradients(exact, data64, x_bar64), reference).max()) < 1e-9
    gen = torch.Generator().manual_seed(5)
    tangents64 = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in data64]
    tangents64[0] = tangents64[0] + tangents64[0].mT
    ref_tangent = layer_tangents(exact, data64, tangents64)
    return data32, x_bar32, reference, [t.float() for t in tangents64], ref_tangent


@pytest.mark.parametrize("case", CASES)
def test_float32_gradients_within_target_of_float64(case, problems):
    data32, x_bar32, reference, tangents32, ref_tangent = problems
    name = case if case in BACKENDS else "ip-primal"
    layer = make(name, **CASES[case])
    grads = layer_gradients(layer, data32, x_bar32)
    assert grads.dtype == torch.float32
    assert (layer.stats.forward.extra["status"] == il.QPStatus.SOLVED).all()
    tangent = layer_tangents(layer, data32, tangents32)
    assert tangent.dtype == torch.float32
    for err in (relative(grads, reference), relative(tangent, ref_tangent)):
        assert float(err.median()) <= 1e-3, err
        assert float(err.max()) <= 1e-2, err


@pytest.mark.parametrize("solver", [il.InteriorPoint(), il.InteriorPoint(dtype=None), il.OSQP()],
                         ids=["ip-float64-compute", "ip-float32-compute", "osqp"])
def test_solved_promises_the_returned_float32_point(solver):
    """A fuzz case (G scaled by 1e30, float32): the float64 solve's multipliers cancel to
    1e-8 relative, and rounded to float32 the point's dual residual is O(1). A sample is
    SOLVED only if the point actually returned passes the test at float32's tolerance."""
    f32 = dict(dtype=torch.float32)
    Q, c = torch.tensor([[[1.002]]], **f32), torch.tensor([[1.9112]], **f32)
    G = torch.tensor([[[-2.3103e29], [3.4593e29]]], **f32)
    h, lower = torch.tensor([[0.5435, 1.1082]], **f32), torch.tensor([[-0.6048, -0.6112]], **f32)
    P = QPProblem.from_data(Q, c, torch.zeros(1, 0, 1, **f32), torch.zeros(1, 0, **f32), G, lower, h)
    sol = solver.solve(P)
    res = optimality_residual(P.to(torch.float64), sol.x.double(), sol.lam.double(), sol.mu.double())
    solved = sol.status == il.QPStatus.SOLVED
    assert bool((~solved | (res <= 1e-5)).all()), (sol.status, res)
    assert bool((sol.stats.converged == solved).all())
