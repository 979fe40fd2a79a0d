"""One small, well-posed problem per public layer, for the contract tests (transforms,
torch.compile): a module ``model(*inputs) -> Tensor`` (several outputs concatenated) and a
generator of its inputs, per sample or with a leading batch dim. float64 throughout."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import implicit_layers as il

DT = torch.float64


class Call(nn.Module):
    """``model(*inputs) = call(layer, *inputs)``: a layer with its calling convention."""

    def __init__(self, layer: nn.Module, call: Callable):
        super().__init__()
        self.layer, self.call = layer, call

    def forward(self, *inputs: Tensor) -> Tensor:
        return self.call(self.layer, *inputs)


@dataclass
class Case:
    name: str
    make: Callable[[], nn.Module]
    inputs: Callable[[torch.Generator, tuple[int, ...]], tuple[Tensor, ...]]

    def sample(self, batch: tuple[int, ...] = (), seed: int = 0) -> tuple[Tensor, ...]:
        return self.inputs(torch.Generator().manual_seed(seed), tuple(batch))

    def __repr__(self) -> str:
        return self.name


def _randn(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=DT)


def _rand(gen, *shape):
    return torch.rand(*shape, generator=gen, dtype=DT)


def _spd(gen, batch, n):
    L = _randn(gen, *batch, n, n)
    return L @ L.mT / n + torch.eye(n, dtype=DT)


def _stable(gen, batch, n, radius=0.3):
    """A matrix with ‖·‖₂ ≤ radius (shifted to the left half plane by the callers)."""
    M = _randn(gen, *batch, n, n)
    return radius * M / torch.linalg.matrix_norm(M, 2).unsqueeze(-1).unsqueeze(-1)


def _cubic(x, y):
    p, q = x
    return y ** 3 + p * y - q


def _deq_cell(x, z):
    u, s = x
    return s * torch.tanh(z) + u


def _quartic(x, y):
    u, a = x
    return ((y - u) ** 2).sum(-1) + (a * y ** 4).sum(-1)


def _curved(x, y):
    u, a = x
    return torch.cat([y - u, a * y ** 2], -1)


SIMPLEX_A = torch.ones(1, 3, dtype=DT)
SIMPLEX_B = torch.ones(1, dtype=DT)
SIMPLEX_G = -torch.eye(3, dtype=DT)
SIMPLEX_H = torch.zeros(3, dtype=DT)
NOISE = torch.randn(6, 3, generator=torch.Generator().manual_seed(7), dtype=DT)


CASES = [
    Case("RootFindLayer",
         lambda: Call(il.RootFindLayer(_cubic), lambda f, p, q: f((p, q), torch.zeros_like(q))),
         lambda g, b: (1 + _rand(g, *b, 3), _randn(g, *b, 3))),
    Case("DEQLayer",
         lambda: Call(il.DEQLayer(_deq_cell, il.Anderson(tol=1e-12),
                                  il.FixedPointAdjoint(il.Anderson(tol=1e-13))),
                      lambda f, u, s: f((u, s), torch.zeros_like(u))),
         lambda g, b: (_randn(g, *b, 3), 0.2 + 0.3 * _rand(g, *b, 3))),
    Case("ArgminLayer",
         lambda: Call(il.ArgminLayer(_quartic, il.NewtonCG()),
                      lambda f, u, a: f((u, a), torch.zeros_like(u))),
         lambda g, b: (_randn(g, *b, 3), 0.5 + _rand(g, *b, 3))),
    Case("LeastSquaresLayer",
         lambda: Call(il.LeastSquaresLayer(_curved), lambda f, u, a: f((u, a), torch.zeros_like(u))),
         lambda g, b: (_randn(g, *b, 3), 0.3 + 0.3 * _rand(g, *b, 3))),
    Case("EqualityQPLayer",
         lambda: Call(il.EqualityQPLayer(), lambda f, *qp: torch.cat(f(*qp), -1)),
         lambda g, b: (_spd(g, b, 3), _randn(g, *b, 3), _randn(g, *b, 1, 3), _randn(g, *b, 1))),
    Case("QPLayer",  # one equality, two two-sided inequality rows
         lambda: Call(il.QPLayer(), lambda f, Q, c, A, b, G, h, lo: torch.cat(
             f(Q, c, A, b, G, h, lo), -1)),
         lambda g, b: (_spd(g, b, 3), _randn(g, *b, 3), _randn(g, *b, 1, 3), _randn(g, *b, 1),
                       _randn(g, *b, 2, 3), -0.1 + 0.01 * _rand(g, *b, 2),
                       -5 - _rand(g, *b, 2))),
    Case("LyapunovLayer",
         lambda: Call(il.LyapunovLayer(), lambda f, A, Q: f(A, Q)),
         lambda g, b: (_stable(g, b, 2) - torch.eye(2, dtype=DT), _spd(g, b, 2))),
    Case("DiscreteLyapunovLayer",
         lambda: Call(il.DiscreteLyapunovLayer(), lambda f, A, Q: f(A, Q)),
         lambda g, b: (_stable(g, b, 2, 0.6), _spd(g, b, 2))),
    Case("SylvesterLayer",
         lambda: Call(il.SylvesterLayer(), lambda f, A, B, C: f(A, B, C)),
         lambda g, b: (_stable(g, b, 2) + torch.eye(2, dtype=DT),
                       _stable(g, b, 3) + 2 * torch.eye(3, dtype=DT), _randn(g, *b, 2, 3))),
    Case("SmoothedLP",
         lambda: Call(il.SmoothedLP(0.5),
                      lambda f, c: f(c, SIMPLEX_A, SIMPLEX_B, SIMPLEX_G, SIMPLEX_H)),
         lambda g, b: (0.3 * _randn(g, *b, 3),)),
    Case("PerturbedLP",
         lambda: Call(il.PerturbedLP(0.5, samples=6),
                      lambda f, c: f(c, SIMPLEX_A, SIMPLEX_B, SIMPLEX_G, SIMPLEX_H,
                                     noise=NOISE.reshape(6, *([1] * (c.ndim - 1)), 3)
                                     .expand(6, *c.shape))),
         lambda g, b: (_randn(g, *b, 3),)),
]

BY_NAME = {case.name: case for case in CASES}
