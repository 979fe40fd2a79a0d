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

import torch

import implicit_layers as il
from experiments.bench.harness import ratio, steady_malloc, timeit
from experiments.bench.qp_problems import active_set_gradients, strictly_complementary_qp

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


def _measure(name, fn, data, xs, x_bar, ref, repeat):
    args = [t.clone().requires_grad_() for t in data]
    with torch.no_grad():
        t_fwd = timeit(lambda: fn(*data), repeat=repeat, warmup=1 if repeat > 1 else 0)

    def fwd_bwd():
        for a in args:
            a.grad = None
        (fn(*args) * x_bar).sum().backward()

    t_both = timeit(fwd_bwd, repeat=repeat, warmup=1 if repeat > 1 else 0)
    x = fn(*data).detach()
    scale = max(float(g.abs().max()) for g in ref)
    compared = NAMES if not name.startswith("cvxpylayers") else NAMES[1:]  # their Q-gradient goes to L
    grad_err = max(float((a.grad - g).abs().max()) for a, g, k in zip(args, ref, NAMES, strict=True)
                   if k in compared) / scale
    return {"forward_s": t_fwd, "fwd_bwd_s": t_both, "x_err": float((x - xs).abs().max()),
            "grad_err_rel": grad_err}


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
        methods = {"ours": (_ours(), cfg.repeat), "ours_primal": (_ours(kkt_form="primal"), cfg.repeat),
                   "ours_all_cores": (_ours(threads=os.cpu_count()), cfg.repeat),
                   "qpth": (_qpth(), cfg.repeat)}
        if B in cfg.cvxpylayers_batch_sizes:
            for variant, args in cfg.cvxpylayers_variants.items():
                methods[f"cvxpylayers_{variant}"] = (_cvxpylayers(cfg.n, cfg.m, cfg.p, args), cfg.slow_repeat)
        results = {k: _measure(k, fn, data, xs, x_bar, ref, rep) for k, (fn, rep) in methods.items()}
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
