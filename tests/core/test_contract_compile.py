"""Observation 6 of issue 13: every layer inside ``torch.compile(model)`` (default inductor
backend) gives eager's values and gradients.

The solve is a compiler-disabled region (:func:`implicit_layers.compat.compiler_disable`), so
the compiler traces the model around it (graph breaks) but never the solver's loop: the solve
runs the same algorithm as in eager mode, which the matching iteration counts confirm. Before,
a compiled QPLayer raised a ConvergenceError that eager did not (or, warned, was off by 1.36).
"""

import pytest
import torch
from torch import nn

from tests.core.layer_zoo import CASES
from tests.layers.qp_fixtures import one_thread  # noqa: F401 (autouse fixture)


class Pipeline(nn.Module):
    """Ops before and after the layer, so that the compiler has graphs to build around it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *xs):
        return torch.tanh(self.model(*(x * 1.0 for x in xs))).square().sum()


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_compiled_model_matches_eager_values_gradients_and_iterations(case):
    torch.compiler.reset()  # a fresh cache: each layer is compiled, not replayed eagerly
    model = Pipeline(case.make())
    compiled = torch.compile(model)
    xs = [x.requires_grad_() for x in case.sample((2,), seed=1)]
    stats = {}
    for name, fn in (("eager", model), ("compiled", compiled)):
        loss = fn(*xs)
        grads = torch.autograd.grad(loss, xs)
        forward = getattr(model.model.layer, "stats", None)
        stats[name] = (loss.detach(), grads, None if forward is None or forward.forward is None
                       else forward.forward.iterations.clone())
    (l_e, g_e, it_e), (l_c, g_c, it_c) = stats["eager"], stats["compiled"]
    torch.testing.assert_close(l_c, l_e, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(g_c, g_e, atol=1e-10, rtol=1e-10)
    if it_e is not None:  # the same algorithm ran: same iterations per sample
        assert torch.equal(it_c, it_e)
