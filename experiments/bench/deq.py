"""DEQ benchmark: ``z = tanh(ρ W z + U x)`` against torchdeq and against unrolled backprop.

For each ρ, one process runs, on the same cell and data:

* ``ours``: ``il.DEQLayer`` with Anderson forward (``rtol``) and the implicit backward
  (``FixedPointAdjoint(Anderson)`` with ``backward_rtol``);
* ``torchdeq``: ``get_deq(core="indexing", ift=True)`` with Anderson forward and backward at the
  same relative tolerances (torchdeq's ``stop_mode="rel"``);
* ``unrolled``: backprop through ``N`` Picard steps (memory only).

Reported: cell evaluations in the forward (``fwd_evals``, counted inside the cell), VJPs
through the cell in the backward (``bwd_vjps``), median wall times, bytes saved for backward
(``harness.saved_tensor_bytes``; ``act_MB`` excludes the parameters and the input, which exist
anyway), CUDA peak memory when on a GPU, and the cosine of the gradient (w.r.t. W, U, x) to a
float64 reference solved to 1e-12.

W is symmetric with spectral radius 1, so ``ρ`` is the spectral radius of ``ρ W`` and the
cell is a ``ρ``-contraction.
"""

from __future__ import annotations

import torch
from torch import nn
from torchdeq import get_deq

import implicit_layers as il
from experiments.bench.harness import cuda_peak_bytes, ratio, saved_tensor_bytes, timeit

MB = 2.0**20


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
        ctx.counter["vjps"] += 1
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
        self.counter = {"evals": 0, "vjps": 0}

    def forward(self, x, z):
        out = torch.tanh(self.rho * z @ self.W.T + x @ self.U.T)
        if self.counting:
            self.counter["evals"] += 1
            out = _CountVJP.apply(out, self.counter)
        return out


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
    cell.counter.update(evals=0, vjps=0)
    cell.counting = True
    try:
        out = fn()
    finally:
        cell.counting = False
    return out


def main(cfg) -> list[dict]:
    device = torch.device(cfg.device if torch.cuda.is_available() or cfg.device == "cpu" else "cpu")
    dtype = getattr(torch, cfg.dtype)
    B, d = cfg.batch, cfg.dim
    rows: list[dict] = []
    for rho in cfg.rhos:
        cell = TanhCell(d, rho, cfg.seed, dtype, device)
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        x = (cfg.x_scale * torch.randn(B, d, generator=gen, dtype=torch.float64)).to(dtype=dtype,
                                                                                     device=device)
        weights = torch.randn(B, d, generator=gen, dtype=torch.float64).to(dtype=dtype,
                                                                           device=device)
        z0 = torch.zeros(B, d, dtype=dtype, device=device)

        layer = il.DEQLayer(
            cell,
            solver=il.Anderson(m=cfg.memory, tol=0.0, rtol=cfg.rtol, max_iter=cfg.max_iter),
            adjoint=il.FixedPointAdjoint(il.Anderson(m=cfg.memory, tol=0.0, rtol=cfg.backward_rtol,
                                                     max_iter=cfg.max_iter)),
            warn_residual=None,
        )
        tdeq = get_deq(core="indexing", ift=True, f_solver="anderson", b_solver="anderson",
                       f_tol=cfg.rtol, b_tol=cfg.backward_rtol, f_stop_mode="rel",
                       b_stop_mode="rel", f_max_iter=cfg.max_iter, b_max_iter=cfg.max_iter)
        tdeq.train()

        def ours(xx):
            return layer(xx, z0)

        def theirs(xx):
            return tdeq(lambda z: cell(xx, z), z0)[0][-1]

        def unrolled(xx, n):
            z = z0
            for _ in range(n):
                z = cell(xx, z)
            return z

        # float64 reference gradient, solved to 1e-12
        ref_cell = TanhCell(d, rho, cfg.seed, torch.float64, device)
        ref_layer = il.DEQLayer(
            ref_cell, solver=il.Anderson(m=cfg.memory, tol=1e-12, rtol=1e-12, max_iter=2000),
            adjoint=il.FixedPointAdjoint(il.Anderson(m=cfg.memory, tol=1e-12, rtol=1e-12,
                                                     max_iter=2000)))
        ref = _grads(lambda xx: ref_layer(xx, z0.double()), ref_cell, x.double(), weights.double())

        fixed = {p.data_ptr() for p in (cell.W, cell.U)}
        fixed_bytes = sum(p.untyped_storage().nbytes() for p in (cell.W, cell.U, x))
        xg = x.detach().clone().requires_grad_()
        for name, run in (("ours", ours), ("torchdeq", theirs)):
            _counted(cell, lambda run=run: run(xg))
            evals = cell.counter["evals"]
            z = _counted(cell, lambda run=run: run(xg))
            cell.counting = True
            cell.counter["vjps"] = 0
            torch.autograd.grad((z * weights).sum(), (cell.W, cell.U, xg))
            cell.counting = False
            vjps = cell.counter["vjps"]
            grads = _grads(run, cell, x, weights)

            def fwd(run=run):
                with torch.no_grad():
                    return run(x)

            def fwd_bwd(run=run):
                return _grads(run, cell, x, weights)

            saved = saved_tensor_bytes(lambda run=run: run(xg))
            row = {
                "case": f"rho={rho}", "method": name, "fwd_evals": evals, "bwd_vjps": vjps,
                "fwd_ms": 1e3 * timeit(fwd, repeat=cfg.repeat, device=device),
                "fwd_bwd_ms": 1e3 * timeit(fwd_bwd, repeat=cfg.repeat, device=device),
                "saved_MB": saved / MB,
                "act_MB": (saved - fixed_bytes) / MB,
                "grad_cos": _cosine(grads, ref),
                "grad_rel_err": float(torch.cat([(g.double() - r).flatten() for g, r in
                                                 zip(grads, ref)]).norm()
                                      / torch.cat([r.flatten() for r in ref]).norm()),
            }
            peak = cuda_peak_bytes(fwd_bwd)
            if peak is not None:
                row["cuda_peak_MB"] = peak / MB
            if name == "ours":
                row["fwd_iters"] = int(layer.stats.forward.iterations.max())
                row["bwd_iters"] = int(layer.stats.backward.iterations.max())
            rows.append(row)
        ours_row, their_row = rows[-2], rows[-1]
        for key in ("fwd_evals", "bwd_vjps", "fwd_ms", "fwd_bwd_ms", "act_MB"):
            ours_row[f"{key}_ratio"] = ratio(ours_row[key], their_row[key])
        for n in cfg.unroll_iters:
            saved = saved_tensor_bytes(lambda n=n: unrolled(xg, n))
            row = {"case": f"rho={rho}", "method": f"unrolled x{n}", "saved_MB": saved / MB,
                   "act_MB": (saved - fixed_bytes) / MB,
                   "ours_act_reduction": (saved - fixed_bytes) / max(ours_row["act_MB"] * MB, 1.0),
                   "ours_saved_reduction": saved / (ours_row["saved_MB"] * MB)}
            peak = cuda_peak_bytes(lambda n=n: _grads(lambda xx: unrolled(xx, n), cell, x, weights))
            if peak is not None:
                row["cuda_peak_MB"] = peak / MB
            rows.append(row)
        del fixed
    return rows
