"""Observation 7 of issue 13: a layer whose residual is an ``nn.Module`` may be called from
several threads at once.

The layer evaluates the module with the autograd function's inputs in place of its
parameters (inside transforms and the backward); that swap is a critical section under one
lock (:func:`implicit_layers.compat.swapped_parameters`). Before, four threads lost 1–21 % of
the summed gradient, left foreign tensors in place of the module's Parameters, and functorch
failed an internal assert.
"""

import threading

import pytest
import torch

import implicit_layers as il

DT = torch.float64
THREADS, TRIALS = 4, 6


class Cell(torch.nn.Module):
    def __init__(self, n=6):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.W = torch.nn.Parameter(0.3 * torch.randn(n, n, generator=gen, dtype=DT) / n ** 0.5)
        self.b = torch.nn.Parameter(0.1 * torch.randn(n, generator=gen, dtype=DT))

    def forward(self, x, z):
        return torch.tanh(z @ self.W.T + x + self.b)


class Residual(Cell):
    def forward(self, x, y):
        return super().forward(x, y) - y


LAYERS = {
    "ImplicitLayer-Newton": lambda: il.ImplicitLayer(Residual(), il.Newton()),
    "DEQLayer-Anderson": lambda: il.DEQLayer(Cell()),
    "RootFindLayer-Krylov": lambda: il.RootFindLayer(
        Residual(), il.Broyden(), il.KrylovAdjoint(il.GMRES(rtol=1e-12))),
}


def _run(layer, x):
    y = layer(x, torch.zeros_like(x))
    y.square().sum().backward()


@pytest.mark.parametrize("make", LAYERS.values(), ids=LAYERS.keys())
def test_four_threads_sum_the_single_thread_gradients(make):
    layer = make()
    params = dict(layer.named_parameters())
    own = {name: p for name, p in params.items()}
    inputs = [torch.randn(16, 6, generator=torch.Generator().manual_seed(i), dtype=DT)
              for i in range(THREADS)]
    for x in inputs:  # the reference: one thread, one call after the other
        _run(layer, x)
    expected = {name: p.grad.clone() for name, p in params.items()}
    for _ in range(TRIALS):
        layer.zero_grad()
        errors = []

        def work(x, errors):
            try:
                _run(layer, x)
            except BaseException as err:  # noqa: BLE001 (reported below)
                errors.append(err)

        threads = [threading.Thread(target=work, args=(x, errors)) for x in inputs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        for name, p in layer.named_parameters():
            assert p is own[name] and isinstance(p, torch.nn.Parameter)
            torch.testing.assert_close(p.grad, expected[name], atol=1e-10, rtol=1e-10)
