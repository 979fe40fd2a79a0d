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
