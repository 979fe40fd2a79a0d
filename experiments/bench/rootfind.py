"""Root-finding backward: implicit differentiation vs backprop through unrolled Newton.

Problem: ``f(x, y) = tanh(W y + x) − y`` (batch of independent systems). Both methods run
the same number ``K`` of Newton iterations in the forward pass; the unrolled baseline keeps
every iteration in the autograd graph, the implicit layer keeps none and solves one transposed
system in the backward. Reported: forward+backward time, bytes saved for backward, and the
gradient difference between the two.
"""

from __future__ import annotations

import warnings

import torch

import implicit_layers as il
from experiments.bench.harness import ratio, saved_tensor_bytes, timeit


def _problem(cfg, dtype):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(cfg.n, cfg.n, dtype=dtype, generator=g)
    W = cfg.rho * W / torch.linalg.matrix_norm(W, ord=2)
    x = torch.randn(cfg.batch, cfg.n, dtype=dtype, generator=g)
    return W, x


def _residual(W):
    return lambda x, y: torch.tanh(y @ W.T + x) - y


def unrolled_newton(W, x, iters):
    f = _residual(W)
    y = torch.zeros_like(x)
    for _ in range(iters):
        J = torch.func.vmap(torch.func.jacrev(lambda xi, yi: f(xi, yi), argnums=1))(x, y)
        y = y - torch.linalg.solve(J, f(x, y))
    return y


def implicit_newton(W, x, iters):
    layer = il.RootFindLayer(_residual(W), il.Newton(tol=0.0, rtol=0.0, max_iter=iters), on_failure="warn")
    return layer(x, torch.zeros_like(x))


def main(cfg) -> list[dict]:
    torch.set_num_threads(cfg.threads)
    dtype = getattr(torch, cfg.dtype)
    W, x0 = _problem(cfg, dtype)
    rows = []
    warnings.simplefilter("ignore", il.ConvergenceWarning)  # tol=0 runs exactly K iterations
    for iters in cfg.iterations:
        grads, times, mem = {}, {}, {}
        for name, method in (("implicit", implicit_newton), ("unrolled", unrolled_newton)):
            x = x0.clone().requires_grad_()

            def step(method=method, x=x, iters=iters):
                y = method(W, x, iters)
                (g,) = torch.autograd.grad(y.pow(2).sum(), x)
                return g

            grads[name] = step()
            times[name] = timeit(step, repeat=cfg.repeat)
            mem[name] = saved_tensor_bytes(lambda method=method, x=x, k=iters: method(W, x, k))
        rows.append({
            "newton_iterations": iters,
            "implicit_ms": 1e3 * times["implicit"],
            "unrolled_ms": 1e3 * times["unrolled"],
            "time_ratio(implicit/unrolled)": ratio(times["implicit"], times["unrolled"]),
            "implicit_saved_MB": mem["implicit"] / 2**20,
            "unrolled_saved_MB": mem["unrolled"] / 2**20,
            "memory_ratio(implicit/unrolled)": ratio(mem["implicit"], mem["unrolled"]),
            "max_grad_diff": float((grads["implicit"] - grads["unrolled"]).abs().max()),
        })
    return rows
