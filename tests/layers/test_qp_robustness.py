"""Issue 12, item 6: a seeded robustness test of 300 random feasible QPs on every backend.

Sizes n 5–40, m in [n/2, 3n], p in [0, n/4]; a third of the samples with a singular PSD Q;
every third size with two-sided constraints. The problems are feasible and bounded by
construction (tests/layers/qp_references.py) but not built around a known solution. Every
sample must be SOLVED, within 1e-6·(1 + ‖x‖∞) of Clarabel, satisfy its KKT conditions with
signed multipliers, and get a nonzero gradient.
"""

import pytest
import torch

import implicit_layers as il
from tests.layers.qp_backends import BACKENDS, make
from tests.layers.qp_fixtures import one_thread  # noqa: F401 (autouse fixture)
from tests.layers.qp_references import clarabel_batch, random_feasible_qps

SIZES = [(5, 3, 1), (6, 18, 0), (8, 20, 2), (10, 5, 0), (12, 30, 3), (16, 8, 4), (20, 50, 5),
         (25, 40, 6), (30, 15, 2), (40, 100, 10)]  # (n, m, p)
PER_SIZE = {False: 20, True: 10}  # positive definite Q, singular Q


@pytest.fixture(scope="module")
def zoo():
    gen = torch.Generator().manual_seed(2024)
    batches = []
    for k, (n, m, p) in enumerate(SIZES):
        for singular, B in PER_SIZE.items():
            data = random_feasible_qps(gen, B, n, m, p, singular, two_sided=k % 3 == 2)
            x_ref, _, _, status = clarabel_batch(*data)
            assert all(s in ("Solved", "AlmostSolved") for s in status), status
            batches.append((data, x_ref))
    assert sum(d[1].shape[0] for d in batches) == 300
    return batches


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_feasible_qps_all_solved_and_match_clarabel(backend, zoo):
    layer = make(backend, on_failure="warn")
    for (Q, c, A, b, G, lower, upper), x_ref in zoo:
        args = [t.clone().requires_grad_() for t in (Q, c, A, b, G, upper, lower)]
        out, lam, mu = layer(*args[:6], lower=args[6])
        status = layer.stats.forward.extra["status"]
        assert bool((status == il.QPStatus.SOLVED).all()), (Q.shape, status)
        x = out.detach()
        err = (x - x_ref).abs().amax(-1) / (1 + x_ref.abs().amax(-1))
        assert float(err.max()) <= 1e-6, (Q.shape, err.max())
        # signed multipliers: Qx + c + Aᵀλ + Gᵀμ = 0, μ > 0 only at the upper bound, < 0 at the lower
        lam, mu = lam.detach(), mu.detach()
        r_d = Q @ x[..., None] + c[..., None] + A.mT @ lam[..., None] + G.mT @ mu[..., None]
        assert float(r_d.abs().max()) <= 1e-7 * (1 + float(c.abs().max()))
        Gx = (G @ x[..., None])[..., 0]
        slack = torch.where(mu > 0, upper - Gx, torch.where(mu < 0, Gx - lower, 0.0))
        assert float(slack.abs().max()) <= 1e-8 * (1 + float(Gx.abs().max()))
        w = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=x.dtype)
        grads = torch.autograd.grad((out * w).sum(), args)
        per_sample = torch.stack([g.flatten(1).abs().amax(1) for g in grads if g.numel()]).amax(0)
        assert bool(torch.isfinite(per_sample).all() & (per_sample > 0).all())
