"""DEQ benchmark: ``z = tanh(ρ W z + U x)`` against torchdeq and against unrolled backprop.

**Forward solver** (``table = "solver"``): our ``il.Anderson`` against torchdeq's
``anderson_solver`` at its best regularization (λ = 1e-8) and at its default (λ = 1e-4), same
memory, relative tolerance and stopping rule (``‖g(z) − z‖ ≤ rtol ‖·‖``), no autograd, at
each ρ and over the (B, d) sizes of ``scaling`` at ``scaling_rho``. The methods run in
interleaved rounds in one process; reported: cell evaluations (counted in the cell), the
median wall time, ours / theirs, and the final relative residual ``max ‖g(z) − z‖ / ‖z‖``
measured the same way for every method.

**Layers** (``table = "layer"``, when ``layers`` is true): for each ρ, on the same cell and
data:

* ``ours``: ``il.DEQLayer`` with Anderson forward (``rtol``) and the implicit backward
  (``FixedPointAdjoint(Anderson)`` with ``backward_rtol``);
* ``torchdeq``: ``get_deq(core="indexing", ift=True)`` with Anderson forward (λ = 1e-8) and
  backward at the same relative tolerances (torchdeq's ``stop_mode="rel"``); the two are timed
  in interleaved rounds;
* ``unrolled``: backprop through ``N`` Picard steps (memory only).

Reported: cell evaluations in the forward (``fwd_evals``, counted inside the cell), VJPs
through the cell in the backward (``bwd_vjps``), median wall times, bytes saved for backward
(``saved_MB``: ``harness.saved_tensor_bytes``; ``act_MB`` excludes the parameters and the
input, which exist anyway), CUDA peak memory when on a GPU, and the cosine of the gradient
(w.r.t. W, U, x) to a float64 reference solved to 1e-12. Ratios are ours / torchdeq, and
ours / unrolled on the unrolled rows.

W is symmetric with spectral radius 1, so ``ρ`` is the spectral radius of ``ρ W`` and the
cell is a ``ρ``-contraction.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn
from torchdeq import get_deq
from torchdeq.solver.anderson import anderson_solver

import implicit_layers as il
from experiments.bench.harness import (
    cuda_peak_bytes,
    ratio,
    saved_tensor_bytes,
    steady_malloc,
)

MB = 2.0**20


class Counter:
    """Cell evaluations and VJPs (a plain object: torch.func would copy a dict, a pytree)."""

    def __init__(self):
        self.evals = self.vjps = 0


class _CountVJP(torch.autograd.Function):
    """Identity whose backward counts how often a cotangent flows through the cell."""

    @staticmethod
    def forward(t, counter):
        return t.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.counter = inputs[1]

    @staticmethod
    def backward(ctx, g):
        ctx.counter.vjps += 1
        return g, None


class TanhCell(nn.Module):
    """``(x, z) ↦ tanh(ρ W z + U x)``, counting evaluations and VJPs when ``counting``."""

    def __init__(self, d: int, rho: float, seed: int, dtype=torch.float32, device="cpu"):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        A = torch.randn(d, d, generator=gen, dtype=torch.float64)
        S = A + A.T
        S = S / torch.linalg.eigvalsh(S).abs().max()
        self.W = nn.Parameter(S.to(dtype=dtype, device=device))
        U = torch.randn(d, d, generator=gen, dtype=torch.float64) / d**0.5
        self.U = nn.Parameter(U.to(dtype=dtype, device=device))
        self.rho, self.counting = rho, False
        self.counter = Counter()

    def forward(self, x, z):
        out = torch.tanh(self.rho * z @ self.W.T + x @ self.U.T)
        if self.counting:
            self.counter.evals += 1
            out = _CountVJP.apply(out, self.counter)
        return out


def _activation_bytes(fn, exclude: tuple[torch.Tensor, ...]) -> int:
    """Bytes autograd saves while ``fn()`` runs, leaving out the storages of ``exclude``
    (parameters and inputs, which exist anyway): on CPU the proxy for the increase of peak
    memory that the backward pass keeps alive. ``harness.saved_tensor_bytes`` counts them."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        if t.layout == torch.strided and t.untyped_storage().data_ptr() not in skip:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def _cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    fa = torch.cat([t.double().flatten() for t in a])
    fb = torch.cat([t.double().flatten() for t in b])
    return float(fa @ fb / (fa.norm() * fb.norm()))


def _grads(run, cell, x, weights):
    """Gradient of ⟨weights, z⟩ w.r.t. (W, U, x) for one forward+backward ``run``."""
    x = x.detach().clone().requires_grad_()
    z = run(x)
    return list(torch.autograd.grad((z * weights).sum(), (cell.W, cell.U, x)))


def _counted(cell, fn):
    cell.counter = Counter()
    cell.counting = True
    try:
        out = fn()
    finally:
        cell.counting = False
    return out


def _time_interleaved(what: dict, methods: list, rounds: int, device) -> None:
    """Median wall times of ``what[key](run)()`` for each ``(row, run)`` of ``methods``, in
    interleaved rounds (every round times every method once), written into the rows."""
    for key, make in what.items():
        times = [[] for _ in methods]
        for _ in range(rounds):
            for (_, run), out in zip(methods, times):
                out.append(_wall_time(make(run), device))
        for (row, _), out in zip(methods, times):
            row[key] = 1e3 * statistics.median(out)


def _measure(name, run, cell, x, weights, ref, device, layer=None) -> dict:
    """One method's row: counts, memory and gradient accuracy."""
    xg = x.detach().clone().requires_grad_()
    fixed = (cell.W, cell.U, xg)
    z = _counted(cell, lambda: run(xg))
    evals = cell.counter.evals
    iters = {}
    if layer is not None:
        iters["fwd_iters"] = int(layer.stats.forward.iterations.max())
    cell.counting = True
    torch.autograd.grad((z * weights).sum(), (cell.W, cell.U, xg))
    cell.counting = False
    if layer is not None:
        iters["bwd_iters"] = int(layer.stats.backward.iterations.max())
    grads = _grads(run, cell, x, weights)
    flat = torch.cat([(g.double() - r).flatten() for g, r in zip(grads, ref)])
    row = {
        "method": name, "fwd_evals": evals, "bwd_vjps": cell.counter.vjps,
        "saved_MB": saved_tensor_bytes(lambda: run(xg)) / MB,
        "act_MB": _activation_bytes(lambda: run(xg), fixed) / MB,
        "grad_cos": _cosine(grads, ref),
        "grad_rel_err": float(flat.norm() / torch.cat([r.flatten() for r in ref]).norm()),
        **iters,
    }
    peak = cuda_peak_bytes(lambda: _grads(run, cell, x, weights))
    if peak is not None:
        row["cuda_peak_MB"] = peak / MB
    return row


def _case(cfg, rho: float, device, dtype) -> list[dict]:
    B, d = cfg.batch, cfg.dim
    cell = TanhCell(d, rho, cfg.seed, dtype, device)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    x64 = cfg.x_scale * torch.randn(B, d, generator=gen, dtype=torch.float64)
    w64 = torch.randn(B, d, generator=gen, dtype=torch.float64)
    x, weights = x64.to(dtype=dtype, device=device), w64.to(dtype=dtype, device=device)
    z0 = torch.zeros(B, d, dtype=dtype, device=device)

    def anderson(rtol, tol=0.0):
        return il.Anderson(m=cfg.memory, tol=tol, rtol=rtol, max_iter=cfg.max_iter)

    layer = il.DEQLayer(cell, solver=anderson(cfg.rtol),
                        adjoint=il.FixedPointAdjoint(anderson(cfg.backward_rtol)),
                        warn_residual=None)
    tdeq = get_deq(core="indexing", ift=True, f_solver="anderson", b_solver="anderson",
                   f_tol=cfg.rtol, b_tol=cfg.backward_rtol, f_stop_mode="rel", b_stop_mode="rel",
                   f_max_iter=cfg.max_iter, b_max_iter=cfg.max_iter)
    tdeq.train()

    def unrolled(xx, n):
        z = z0
        for _ in range(n):
            z = cell(xx, z)
        return z

    # float64 reference gradient, solved to 1e-12
    ref_cell = TanhCell(d, rho, cfg.seed, torch.float64, device)
    ref_layer = il.DEQLayer(ref_cell, solver=anderson(1e-12, 1e-12),
                            adjoint=il.FixedPointAdjoint(anderson(1e-12, 1e-12)))
    ref = _grads(lambda xx: ref_layer(xx, z0.double()), ref_cell, x.double(), weights.double())

    best = {"lam": cfg.torchdeq_best_lam}

    def run_ours(xx):
        return layer(xx, z0)

    def run_theirs(xx):
        return tdeq(lambda z: cell(xx, z), z0, solver_kwargs=best)[0][-1]

    ours = _measure("ours", run_ours, cell, x, weights, ref, device, layer)
    theirs = _measure("torchdeq", run_theirs, cell, x, weights, ref, device)
    xg = x.detach().clone().requires_grad_()
    _time_interleaved({"fwd_ms": lambda run: (lambda: run(xg)),
                       "fwd_bwd_ms": lambda run: (lambda: _grads(run, cell, x, weights))},
                      [(ours, run_ours), (theirs, run_theirs)], cfg.rounds, device)
    for key in ("fwd_evals", "bwd_vjps", "fwd_ms", "fwd_bwd_ms", "act_MB"):
        ours[f"{key}_ratio"] = ratio(ours[key], theirs[key])
    rows = [ours, theirs]
    for n in cfg.unroll_iters:
        act = _activation_bytes(lambda n=n: unrolled(xg, n), (cell.W, cell.U, xg)) / MB
        saved = saved_tensor_bytes(lambda n=n: unrolled(xg, n)) / MB
        row = {"method": f"unrolled x{n}", "saved_MB": saved, "act_MB": act,
               "act_MB_ratio": ratio(ours["act_MB"], act),
               "saved_MB_ratio": ratio(ours["saved_MB"], saved)}
        peak = cuda_peak_bytes(lambda n=n: _grads(lambda xx: unrolled(xx, n), cell, x, weights))
        if peak is not None:
            row["cuda_peak_MB"] = peak / MB
            row["cuda_peak_ratio"] = ratio(ours.get("cuda_peak_MB"), row["cuda_peak_MB"])
        rows.append(row)
    return [{"table": "layer", "case": f"rho={rho}", **r} for r in rows]


def _solver_case(cfg, B: int, d: int, rho: float, device, dtype) -> list[dict]:
    """Forward solves only: ours and torchdeq's ``anderson_solver`` (best λ, default λ)."""
    cell = TanhCell(d, rho, cfg.seed, dtype, device)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    x = (cfg.x_scale * torch.randn(B, d, generator=gen, dtype=torch.float64)).to(dtype=dtype,
                                                                                  device=device)
    z0 = torch.zeros(B, d, dtype=dtype, device=device)
    counter = Counter()

    def g(z):
        counter.evals += 1
        return cell(x, z)

    solver = il.Anderson(m=cfg.memory, tol=0.0, rtol=cfg.rtol, max_iter=cfg.max_iter)
    problem = il.RootProblem(lambda z: g(z) - z, fixed_point_map=g)

    def torchdeq(lam):
        return lambda: anderson_solver(g, z0, max_iter=cfg.max_iter, tol=cfg.rtol,
                                       stop_mode="rel", m=cfg.memory, lam=lam)[0]

    methods = {"ours": lambda: solver.solve(problem, z0).y,
               f"torchdeq lam={cfg.torchdeq_best_lam:g}": torchdeq(cfg.torchdeq_best_lam),
               f"torchdeq lam={cfg.torchdeq_default_lam:g} (default)":
                   torchdeq(cfg.torchdeq_default_lam)}
    rows = {}
    with torch.no_grad():
        for name, run in methods.items():
            counter.evals = 0
            z = run()
            res = (cell(x, z) - z).double().norm(dim=-1) / z.double().norm(dim=-1)
            rows[name] = {"evals": counter.evals, "residual": float(res.max()), "times": []}
        for _ in range(cfg.rounds):  # interleaved: every round runs every method once
            for name, run in methods.items():
                rows[name]["times"].append(_wall_time(run, device))
    out = []
    ours = statistics.median(rows["ours"]["times"])
    for name, row in rows.items():
        ms = 1e3 * statistics.median(row.pop("times"))
        out.append({"table": "solver", "case": f"B={B} d={d} rho={rho}", "method": name, **row,
                    "ms": ms, "ours/this ms": ratio(1e3 * ours, ms),
                    "ours/this evals": ratio(rows["ours"]["evals"], row["evals"])})
    return out


def _wall_time(run, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(cfg) -> list[dict]:
    device = torch.device(cfg.device if torch.cuda.is_available() or cfg.device == "cpu" else "cpu")
    dtype = getattr(torch, cfg.dtype)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    steady_malloc()
    rows: list[dict] = []
    sizes = [(cfg.batch, cfg.dim, rho) for rho in cfg.rhos]
    sizes += [(B, d, cfg.scaling_rho) for B, d in cfg.scaling
              if (B, d, cfg.scaling_rho) not in sizes]
    for B, d, rho in sizes:
        rows += _solver_case(cfg, B, d, rho, device, dtype)
    if cfg.layers:
        for rho in cfg.rhos:
            rows += _case(cfg, rho, device, dtype)
    return rows
