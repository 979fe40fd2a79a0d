"""Benchmark: differentiable continuous Lyapunov solves against the straightforward peers.

Every method computes ``P`` from ``A P + P Aᵀ + Q = 0`` and the gradients of
``⟨P̄, P⟩`` (asymmetric ``Q`` and ``P̄``) with respect to ``A`` and ``Q``, in float64:

* ours: ``F.lyapunov`` with the backend ``auto`` picks (and Schur/eig forced), which factors
  ``A`` once and reuses the factors for the adjoint solve;
* (a) ``scipy``: ``scipy.linalg.solve_continuous_lyapunov`` in the forward and again on ``Aᵀ``
  in the backward (two Schur decompositions);
* (b) ``scipy loop``: the same, one matrix at a time over a batch;
* (c) ``kronecker``: ``(I⊗A + A⊗I) vec P = −vec Q`` with ``torch.linalg.solve`` and autograd.
"""

from __future__ import annotations

import statistics

import numpy as np
import scipy.linalg as sla
import torch
from threadpoolctl import threadpool_limits

from experiments.bench.harness import ratio, timeit
from implicit_layers import functional as F
from implicit_layers.layers.lyapunov import LyapunovLayer


class ScipyLyapunov(torch.autograd.Function):
    """Peers (a)/(b): SciPy per matrix in the forward, SciPy again on ``Aᵀ`` in the backward."""

    @staticmethod
    def forward(A, Q):
        a, q = A.detach().numpy(), Q.detach().numpy()
        P = [sla.solve_continuous_lyapunov(a[i], -q[i]) for i in np.ndindex(a.shape[:-2])]
        return torch.from_numpy(np.stack(P).reshape(a.shape))

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0], output)

    @staticmethod
    def backward(ctx, P_bar):
        A, P = ctx.saved_tensors
        a, g = A.numpy(), P_bar.numpy()
        W = [sla.solve_continuous_lyapunov(a[i].T, -g[i]) for i in np.ndindex(a.shape[:-2])]
        W = torch.from_numpy(np.stack(W).reshape(a.shape))
        return W @ P.mT + W.mT @ P, W


def kronecker_lyapunov(A, Q):
    """Peer (c): the n² × n² linear system, differentiated by autograd."""
    n = A.shape[-1]
    eye = torch.eye(n, dtype=A.dtype)
    K = torch.kron(eye, A) + torch.kron(A, eye)
    p = torch.linalg.solve(K, -Q.mT.reshape(n * n))
    return p.reshape(n, n).mT


def problem(batch, n, seed):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(*batch, n, n, generator=g, dtype=torch.float64)
    A = A - 2 * n**0.5 * torch.eye(n, dtype=torch.float64)
    Q = torch.randn(*batch, n, n, generator=g, dtype=torch.float64)
    P_bar = torch.randn(*batch, n, n, generator=g, dtype=torch.float64)
    return A, Q, P_bar


def forward_backward(fn, A, Q, P_bar):
    A, Q = A.clone().requires_grad_(), Q.clone().requires_grad_()
    (fn(A, Q) * P_bar).sum().backward()
    return A.grad, Q.grad


def rel_err(got, want) -> float:
    return max(float((g - w).abs().max() / w.abs().max()) for g, w in zip(got, want, strict=True))


def compare(case, ours, peers, A, Q, P_bar, repeat, target):
    """Time every method (median of ``repeat`` round-robin runs after one warm-up, which the
    gradient computation below provides); ratios and gradient errors are against each peer."""
    rows = []
    grads = {name: forward_backward(fn, A, Q, P_bar) for name, fn in {**ours, **peers}.items()}
    methods = {**ours, **peers}
    samples = {name: [] for name in methods}
    for _ in range(repeat):  # round robin, so that load from other processes hits all alike
        for name, fn in methods.items():
            samples[name].append(timeit(lambda fn=fn: forward_backward(fn, A, Q, P_bar),
                                        repeat=1, warmup=0))
    times = {name: statistics.median(ts) for name, ts in samples.items()}
    for peer in peers:
        for name in ours:
            rows.append({
                "case": case, "method": name, "peer": peer,
                "ours_ms": 1e3 * times[name], "peer_ms": 1e3 * times[peer],
                "ratio": ratio(times[name], times[peer]), "target_ratio": target,
                "grad_rel_err": rel_err(grads[name], grads[peer]),
            })
    return rows


def ours(batch, n):
    picked = LyapunovLayer()
    picked(*problem(batch, n, 0)[:2])
    return {
        f"ours auto={picked.last_backend}": lambda A, Q: F.lyapunov(A, Q),
        "ours schur": lambda A, Q: F.lyapunov(A, Q, backend="schur"),
        "ours eig": lambda A, Q: F.lyapunov(A, Q, backend="eig"),
    }


def main(cfg) -> list[dict]:
    torch.set_num_threads(cfg.threads)
    rows: list[dict] = []
    with threadpool_limits(cfg.threads):
        for n in cfg.single_n:
            A, Q, P_bar = problem((1,), n, cfg.seed)
            rows += compare(f"single n={n}", ours((), n), {"(a) scipy": ScipyLyapunov.apply},
                            A[0:1], Q[0:1], P_bar[0:1], cfg.repeat, 0.6 if n == 200 else None)
        for n in cfg.batch_n:
            A, Q, P_bar = problem((cfg.batch,), n, cfg.seed)
            rows += compare(f"batch {cfg.batch} n={n}", ours((cfg.batch,), n),
                            {"(b) scipy loop": ScipyLyapunov.apply}, A, Q, P_bar, cfg.repeat, 0.2)
        for n in cfg.kron_n:
            A, Q, P_bar = problem((), n, cfg.seed)
            rows += compare(f"single n={n}", ours((), n), {"(c) kronecker": kronecker_lyapunov},
                            A, Q, P_bar, cfg.repeat, 0.05)
    return rows
