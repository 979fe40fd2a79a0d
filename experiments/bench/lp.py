"""Benchmark ``lp``: forward+backward of a batch of shortest-path LPs through our surrogate
gradients, against cvxpylayers (and PyEPO's own perturbed optimizer), in one process.

The problem: PyEPO's grid shortest path (``grid``, costs from ``pyepo.data.shortestpath.genData``
with ``deg``, ``noise_width``), ``B`` instances, float64. Timed: the forward call and the
forward + backward of ``⟨ȳ, y(c)⟩`` for a fixed random ``ȳ``, methods interleaved in rounds.

* ``smoothed`` case, ``x_γ(c) = argmin cᵀx + ½γ‖x‖²``: ``il.SmoothedLP`` against cvxpylayers
  on the same QP (its defaults: SCS at default accuracy, derivative by LSQR; tight SCS
  tolerances; each on all cores (diffcp's default process pool) and on one core). Reference:
  ours at ``tol=1e-13``, checked against Clarabel through cvxpy (``reference_x_err``) and its
  gradient against central differences (``reference_fd_rel_err``).
* ``perturbed`` case, ``y_σ(c) = E[x*(c + σZ)]`` with ``S`` samples and the leave-one-out
  estimator: ``il.PerturbedLP`` against the same estimator computed from cvxpylayers' LP
  solutions (a forward-only call on the ``S·B`` perturbed LPs: the estimator needs no
  derivative of the solver), all with the same noise ``Z``, and PyEPO's ``perturbedOpt`` with
  its OR-Tools (GLOP) model (its own noise, so no error columns). Reference: the estimator
  from exact solutions (the cheapest of all grid paths by enumeration).
"""

from __future__ import annotations

import numpy as np
import torch

import implicit_layers as il
from experiments.bench.harness import interleaved_medians, ratio, steady_malloc
from implicit_layers.testing.lp_problems import grid_paths, shortest_path_lp


def _cvxpylayers(lp, gamma: float | None, solver_args: dict):
    """``c ↦ x`` by cvxpylayers for the LP (``gamma=None``) or the smoothed QP."""
    import cvxpy as cp
    from cvxpylayers.torch import CvxpyLayer

    A, b, _, _ = (t.numpy() for t in lp)
    x, c = cp.Variable(A.shape[1]), cp.Parameter(A.shape[1])
    objective = c @ x + (0 if gamma is None else gamma / 2 * cp.sum_squares(x))
    layer = CvxpyLayer(cp.Problem(cp.Minimize(objective), [A @ x == b, x >= 0]),
                       parameters=[c], variables=[x])

    def solve(c):
        args = dict(solver_args)
        if not (torch.is_grad_enabled() and c.requires_grad):
            args.pop("n_jobs_backward", None)  # diffcp's forward-only path passes it on to SCS
        return layer(c, solver_args=args)[0]

    return solve


def _estimator(X, Z, sigma):
    """The leave-one-out perturbed estimator from solutions ``X`` and noise ``Z`` (S, B, n):
    value ``X̄`` and Jacobian ``(1/(σ(S − 1))) Σₛ (Xₛ − X̄) Zₛᵀ`` per instance."""
    y = X.mean(0)
    return y, torch.einsum("sbi,sbj->bij", X - y, Z) / (sigma * (len(X) - 1))


def _perturbed_by(solve_lp, sigma, Z):
    """``c ↦ y`` with the estimator's gradient, from a forward-only LP solver."""

    def fn(c):
        with torch.no_grad():
            X = solve_lp((c.detach() + sigma * Z).reshape(-1, c.shape[-1])).reshape(Z.shape)
        y, J = _estimator(X, Z, sigma)
        return y + torch.einsum("bij,bj->bi", J, c - c.detach())  # value y, gradient Jᵀȳ

    return fn


def _pyepo_perturbed(grid, samples: int, sigma: float):
    from pyepo.func import perturbedOpt
    from pyepo.model.ort import shortestPathModel

    dpo = perturbedOpt(shortestPathModel(tuple(grid)), n_samples=samples, sigma=sigma, processes=1,
                       seed=0)
    return lambda c: dpo(c.float()).to(c.dtype)


def _reference_smoothed(c, lp, gamma, y_bar):
    layer = il.SmoothedLP(gamma, solver=il.InteriorPoint(tol=1e-13))
    c = c.clone().requires_grad_()
    x = layer(c, *lp)
    (g,) = torch.autograd.grad((x * y_bar).sum(), c)
    import cvxpy as cp

    A, b, _, _ = (t.numpy() for t in lp)
    v = cp.Variable(A.shape[1])
    errs = []
    for i in range(len(c)):
        cp.Problem(cp.Minimize(c[i].detach().numpy() @ v + gamma / 2 * cp.sum_squares(v)),
                   [A @ v == b, v >= 0]).solve(solver=cp.CLARABEL, tol_gap_abs=1e-12,
                                               tol_gap_rel=1e-12, tol_feas=1e-12)
        errs.append(np.abs(v.value - x[i].detach().numpy()).max())
    d, eps = torch.randn(c.shape[-1], dtype=c.dtype, generator=torch.Generator().manual_seed(3)), 1e-6
    f = lambda s: float((layer(c[:1].detach() + s * d, *lp) * y_bar[:1]).sum())  # noqa: E731
    fd, an = (f(eps) - f(-eps)) / (2 * eps), float((g[0] * d).sum())
    checks = {"reference_x_err": float(max(errs)), "reference_fd_rel_err": abs(fd - an) / abs(an)}
    return x.detach(), g, checks


def _measure(methods: dict, c, y_bar, ref_x, ref_grad, rounds: int) -> dict[str, dict]:
    inputs = {k: c.clone().requires_grad_() for k in methods}

    def fwd_bwd(k):
        inputs[k].grad = None
        (methods[k](inputs[k]) * y_bar).sum().backward()

    def fwd(k):
        with torch.no_grad():
            return methods[k](c)

    calls = {}
    for k in methods:
        calls[(k, "forward_s")] = lambda k=k: fwd(k)
        calls[(k, "fwd_bwd_s")] = lambda k=k: fwd_bwd(k)
    times = interleaved_medians(calls, rounds)
    out = {}
    for k in methods:
        row = {"forward_s": times[(k, "forward_s")], "fwd_bwd_s": times[(k, "fwd_bwd_s")]}
        if ref_x is not None and not k.startswith("pyepo"):
            row["x_err"] = float((fwd(k) - ref_x).abs().max())
            row["grad_err_rel"] = float((inputs[k].grad - ref_grad).abs().max() / ref_grad.abs().max())
        out[k] = row
    return out


def main(cfg) -> list[dict]:
    from pyepo.data.shortestpath import genData

    torch.set_num_threads(int(cfg.threads))
    steady = steady_malloc() if cfg.steady_malloc else False
    grid, B = tuple(cfg.grid), int(cfg.batch_size)
    lp = shortest_path_lp(grid)
    _, costs = genData(B, cfg.n_features, grid, deg=cfg.deg, noise_width=cfg.noise_width, seed=cfg.seed)
    c = torch.as_tensor(np.asarray(costs, dtype=np.float64))
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    y_bar = torch.randn(c.shape, dtype=c.dtype, generator=gen)
    rows = []

    # smoothed: the same QP for everyone, exact gradients
    gamma = float(cfg.gamma)
    ref_x, ref_grad, checks = _reference_smoothed(c, lp, gamma, y_bar)
    smoothed = il.SmoothedLP(gamma)
    methods = {"ours": lambda c: smoothed(c, *lp)}
    methods |= {f"cvxpylayers_{k}": _cvxpylayers(lp, gamma, dict(v))
                for k, v in cfg.cvxpylayers_variants.items()}
    results = _measure(methods, c, y_bar, ref_x, ref_grad, cfg.rounds)
    rows += _rows(f"smoothed γ={gamma} B={B} n={c.shape[1]} f64", results, checks, steady)

    # perturbed: the same noise for everyone but PyEPO
    sigma, S = float(cfg.sigma), int(cfg.samples)
    Z = torch.randn(S, *c.shape, dtype=c.dtype, generator=gen)
    paths = grid_paths(grid)
    X = paths[((c + sigma * Z) @ paths.T).argmin(-1)]
    ref_y, J = _estimator(X, Z, sigma)
    ref_grad = torch.einsum("bij,bi->bj", J, y_bar)
    ours = il.PerturbedLP(sigma, S)
    methods = {"ours": lambda c: ours(c, *lp, noise=Z)}
    methods |= {f"cvxpylayers_{k}": _perturbed_by(_cvxpylayers(lp, None, dict(v)), sigma, Z)
                for k, v in cfg.cvxpylayers_variants.items()}
    methods["pyepo_perturbedOpt_ortools"] = _pyepo_perturbed(grid, S, sigma)
    results = _measure(methods, c, y_bar, ref_y, ref_grad, cfg.rounds)
    rows += _rows(f"perturbed σ={sigma} S={S} B={B} n={c.shape[1]} f64", results, {}, steady)
    return rows


def _rows(case: str, results: dict[str, dict], checks: dict, steady: bool) -> list[dict]:
    ours = results["ours"]
    return [{"case": case, "method": k, **r,
             "fwd_ratio_ours/theirs": ratio(ours["forward_s"], r["forward_s"]) if k != "ours" else None,
             "fwd_bwd_ratio_ours/theirs": ratio(ours["fwd_bwd_s"], r["fwd_bwd_s"]) if k != "ours" else None,
             **checks, "steady_malloc": steady}
            for k, r in results.items()]
