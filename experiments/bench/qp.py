"""Benchmark ``qp``: QPLayer (interior point) against qpth and cvxpylayers, in one process.

Random batches of strictly complementary QPs with a known solution (n variables, m
inequalities, p equalities, float64). For each method: forward time, forward+backward time,
the solution error and the gradient error of ``L = ⟨x̄, x*⟩`` against an exact active-set
reference (itself checked against central finite differences of the exact solution map).

Methods: ``ours`` (default settings: the dual KKT order here), ``ours_primal``
(``kkt_form="primal"``, the other order), ``ours_all_cores`` (as ``ours`` with one torch
thread per core, as diffcp's default process pool uses every core), qpth, and cvxpylayers
in each configuration of ``cvxpylayers_variants``: its defaults (SCS at its default accuracy,
derivative by LSQR), tight SCS tolerances, tight tolerances with diffcp's dense derivative
(``mode="dense"``, both faster and far more accurate than LSQR here), and the ``_1core``
variants of these on one core.
diffcp solves the batch in a process pool over all cores (``n_jobs=-1``) unless a variant
says otherwise; ours runs ``threads`` torch threads. ``steady_malloc`` as in
:func:`experiments.bench.harness.steady_malloc`.
"""

from __future__ import annotations

import os
import statistics
import time

import torch

import implicit_layers as il
from experiments.bench.harness import ratio, steady_malloc
from implicit_layers.testing.qp_problems import active_set_gradients, strictly_complementary_qp

NAMES = ("Q", "c", "A", "b", "G", "h")


def _ours(threads: int | None = None, **solver_options):
    """Our layer; ``threads`` torch threads during the call (default: the benchmark's)."""
    layer = il.QPLayer(solver=il.InteriorPoint(**solver_options))

    def solve(Q, c, A, b, G, h):
        before = torch.get_num_threads()
        torch.set_num_threads(threads or before)
        try:
            return layer(Q, c, A, b, G, h)[0]
        finally:
            torch.set_num_threads(before)

    return solve


def _qpth():
    from qpth.qp import QPFunction

    fn = QPFunction(verbose=-1)
    return lambda Q, c, A, b, G, h: fn(Q, c, G, h, A, b)


def _cvxpylayers(n, m, p, solver_args: dict):
    """cvxpylayers needs DPP: ``Q = LLᵀ`` enters through ``‖Lᵀx‖²``; gradients reach ``Q`` via L."""
    import cvxpy as cp
    from cvxpylayers.torch import CvxpyLayer

    x = cp.Variable(n)
    L, c, A, b, G, h = (cp.Parameter(s) for s in ((n, n), n, (p, n), p, (m, n), m))
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(L.T @ x) + c @ x), [A @ x == b, G @ x <= h])
    layer = CvxpyLayer(prob, parameters=[L, c, A, b, G, h], variables=[x])

    def solve(Q, c, A, b, G, h):
        Lq = torch.linalg.cholesky(Q)
        args = dict(solver_args)
        if not (torch.is_grad_enabled() and any(t.requires_grad for t in (Q, c, A, b, G, h))):
            # diffcp's forward-only path would pass these on to SCS, which rejects them
            args.pop("mode", None), args.pop("n_jobs_backward", None)
        return layer(Lq, c, A, b, G, h, solver_args=args)[0]

    return solve


def _fd_check(Q, c, A, b, G, h, x_bar, ref, eps=1e-6) -> float:
    """Relative error of the reference's directional derivative vs central differences."""
    gen = torch.Generator().manual_seed(1)
    dirs = [torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in (Q, c, A, b, G, h)]
    dirs[0] = dirs[0] + dirs[0].mT
    solver = il.QPLayer(solver=il.InteriorPoint(tol=1e-13))

    def f(s):
        args = [t + s * d for t, d in zip((Q, c, A, b, G, h), dirs, strict=True)]
        return (solver(*args)[0] * x_bar).sum()

    fd = (f(eps) - f(-eps)) / (2 * eps)
    an = sum((g * d).sum() for g, d in zip(ref, dirs, strict=True))
    return float((fd - an).abs() / an.abs().clamp_min(1e-12))


def _measure(methods: dict, data, xs, x_bar, ref, rounds: int) -> dict:
    """Forward and forward+backward medians of every method, timed in interleaved rounds (one
    call of each method per round, after a warm-up call) so that drifts of the machine's speed
    fall on all methods alike; then each method's solution and gradient errors."""
    args = {k: [t.clone().requires_grad_() for t in data] for k in methods}

    def fwd_bwd(name):
        for a in args[name]:
            a.grad = None
        (methods[name](*args[name]) * x_bar).sum().backward()

    def fwd(name):
        with torch.no_grad():
            methods[name](*data)

    times = {k: ([], []) for k in methods}
    for r in range(rounds + 1):
        for k in methods:
            for run, bucket in ((fwd, times[k][0]), (fwd_bwd, times[k][1])):
                t0 = time.perf_counter()
                run(k)
                if r > 0:  # round 0 warms up
                    bucket.append(time.perf_counter() - t0)
    scale = max(float(g.abs().max()) for g in ref)
    results = {}
    for k, fn in methods.items():
        compared = NAMES if not k.startswith("cvxpylayers") else NAMES[1:]  # their Q-gradient goes to L
        grad_err = max(float((a.grad - g).abs().max()) for a, g, name in zip(args[k], ref, NAMES, strict=True)
                       if name in compared) / scale
        with torch.no_grad():
            x_err = float((fn(*data) - xs).abs().max())
        fwd_s, both_s = (statistics.median(t) for t in times[k])
        results[k] = {"forward_s": fwd_s, "fwd_bwd_s": both_s, "x_err": x_err, "grad_err_rel": grad_err}
    return results


def main(cfg) -> list[dict]:
    torch.set_num_threads(int(cfg.threads))
    steady = steady_malloc() if cfg.steady_malloc else False
    rows = []
    for B in cfg.batch_sizes:
        data, (xs, ls, ms) = strictly_complementary_qp(batch=(B,), n=cfg.n, m=cfg.m, p=cfg.p,
                                                       seed=cfg.seed)
        x_bar = torch.randn(B, cfg.n, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        ref = active_set_gradients(*data, xs, ls, ms, x_bar)
        fd_err = _fd_check(*(t[:1] for t in data), x_bar[:1], [g[:1] for g in ref])
        methods = {"ours": _ours(), "ours_primal": _ours(kkt_form="primal"),
                   "ours_all_cores": _ours(threads=os.cpu_count()), "qpth": _qpth()}
        large = B > min(cfg.batch_sizes)  # larger batches: only the main peer variants, fewer rounds
        for variant, args in cfg.cvxpylayers_variants.items():
            if not large or variant in cfg.large_batch_variants:
                methods[f"cvxpylayers_{variant}"] = _cvxpylayers(cfg.n, cfg.m, cfg.p, args)
        results = _measure(methods, data, xs, x_bar, ref, cfg.large_batch_rounds if large else cfg.rounds)
        ours = results["ours"]
        for method, r in results.items():
            peer = method != "ours"
            rows.append({
                "case": f"B={B} n={cfg.n} m={cfg.m} p={cfg.p} f64", "method": method, **r,
                "fwd_ratio_ours/theirs": ratio(ours["forward_s"], r["forward_s"]) if peer else None,
                "fwd_bwd_ratio_ours/theirs": ratio(ours["fwd_bwd_s"], r["fwd_bwd_s"]) if peer else None,
                "reference_fd_rel_err": fd_err, "steady_malloc": steady,
            })
    return rows
