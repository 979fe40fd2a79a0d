"""Benchmark ``argmin``: the hyperparameter gradient through an argmin, ours vs unrolling vs TorchOpt.

A batch of B ridge or L2-regularized logistic regression problems (float64), one penalty λ_b
each, ``w*_b = argmin_w f_b(w, λ_b)`` with ``f = mean loss(X w, t) + ½ λ ‖w‖²``; the outer loss
is the validation loss ``L = Σ_b mean loss(X_val w*_b, t_val)``. Timed: forward + backward of
``dL/dλ`` (B values). Reference: the closed form for ridge (``torch.linalg.solve``,
differentiated by autograd); for logistic regression the exact implicit gradient
``−∇_w Lᵀ H⁻¹ w*`` with the dense Hessian at a minimizer polished by Newton's method to
machine precision (``∂_λ ∇_w f = w``).

Methods:

* ``ours``: ``il.ArgminLayer`` defaults (batched L-BFGS forward, Hessian adjoint: Cholesky of the
  per-problem Hessians, ``d ≤ 64``); ``ours_cg`` with the matrix-free CG adjoint;
  ``ours_newton_cg`` with the Newton-CG forward; ``ours_tol1e-6``: a looser forward tolerance
  (fewer iterations, same saved memory: what "independent of the iterations" means here).
* ``unrolled_gd_K`` / ``unrolled_lbfgs_K``: backprop through K steps of gradient descent (step
  ``1/L``, ``L`` a bound on the Hessian) or of L-BFGS (memory 10, step lengths from an Armijo
  backtracking on detached values), each step recorded by autograd (``create_graph``).
* ``torchopt_*``: ``torchopt.diff.implicit.custom_root`` around the same forward solve as ours
  (so that the rows differ only in the differentiation), with TorchOpt's default linear solve
  (``solve_normal_cg()``, rtol 1e-5), with CG on the symmetric Hessian at our adjoint's
  tolerance (``solve_cg(rtol=1e-12)``, its best setting for accuracy) and with its dense solve
  (``solve_inv()``, which materializes the whole batch's ``Bd × Bd`` Hessian).

Every method runs once per round, rounds interleaved; medians are reported with the bytes the
autograd graph saves for the backward (``harness.saved_tensor_bytes``).
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as tnf

import implicit_layers as il
from experiments.bench.harness import ratio, saved_tensor_bytes, steady_malloc
from implicit_layers.solvers.base import RootProblem

MB = 2.0**20


def make_problem(kind: str, B: int, n: int, d: int, seed: int, scale_range: float,
                 lam_range: tuple[float, float]):
    """Data and penalties of a batch of ridge / logistic problems; feature ``j`` has scale
    ``10^(−scale_range · j/(d−1))``, so the Hessians are ill-conditioned as in practice."""
    gen = torch.Generator().manual_seed(seed)
    scales = 10 ** (-scale_range * torch.linspace(0, 1, d, dtype=torch.float64))
    X = torch.randn(B, 2 * n, d, generator=gen, dtype=torch.float64) * scales
    w_true = torch.randn(B, d, generator=gen, dtype=torch.float64) / (d**0.5 * scales)
    z = (X @ w_true.unsqueeze(-1)).squeeze(-1)
    if kind == "ridge":
        t = z + 0.5 * torch.randn(z.shape, generator=gen, dtype=torch.float64)
    else:
        t = torch.where(torch.rand(z.shape, generator=gen, dtype=torch.float64) < torch.sigmoid(3 * z),
                        1.0, -1.0).to(torch.float64)
    lo, hi = (float(v) for v in lam_range)
    lam = lo * (hi / lo) ** torch.rand(B, generator=gen, dtype=torch.float64)
    data = {"X": X[:, :n], "t": t[:, :n], "X_val": X[:, n:], "t_val": t[:, n:]}
    return data, lam


def loss_fn(kind: str):
    """Per-sample mean loss of predictions ``p`` against targets ``t`` (B,)."""
    if kind == "ridge":
        return lambda p, t: 0.5 * (p - t).square().mean(-1)
    return lambda p, t: tnf.softplus(-t * p).mean(-1)


def _predict(X, w):
    return (X @ w.unsqueeze(-1)).squeeze(-1)


def inner_objective(kind: str):
    loss = loss_fn(kind)

    def objective(x, w):
        X, t, lam = x
        return loss(_predict(X, w), t) + 0.5 * lam * w.square().sum(-1)

    return objective


def outer_loss(kind: str, data, w):
    return loss_fn(kind)(_predict(data["X_val"], w), data["t_val"]).sum()


def reference_gradient(kind: str, data, lam):
    """Closed-form ``dL/dλ`` (ridge), or the exact implicit gradient at a Newton-polished
    minimizer with dense Hessians (logistic)."""
    X, t = data["X"], data["t"]
    n, d = X.shape[-2], X.shape[-1]
    eye = torch.eye(d, dtype=X.dtype)
    if kind == "ridge":
        lam = lam.clone().requires_grad_()
        H = X.mT @ X / n + lam[:, None, None] * eye
        w = torch.linalg.solve(H, (X.mT @ t.unsqueeze(-1)).squeeze(-1) / n)
        return torch.autograd.grad(outer_loss(kind, data, w), lam)[0]
    f = inner_objective(kind)
    w = torch.zeros(X.shape[0], d, dtype=X.dtype)
    hessian = torch.func.vmap(torch.func.hessian(lambda w, X, t, lam: f((X, t, lam), w)))
    gradient = torch.func.vmap(torch.func.grad(lambda w, X, t, lam: f((X, t, lam), w)))
    for _ in range(50):  # Newton's method, quadratically convergent from 0 on these problems
        w = w - torch.linalg.solve(hessian(w, X, t, lam), gradient(w, X, t, lam))
    w = w.requires_grad_()
    (gL,) = torch.autograd.grad(outer_loss(kind, data, w), w)
    return -(gL * torch.linalg.solve(hessian(w.detach(), X, t, lam), w.detach())).sum(-1)


def hessian_bound(kind: str, data, lam):
    X = data["X"]
    scale = 1.0 if kind == "ridge" else 0.25
    return scale * torch.linalg.matrix_norm(X, ord=2) ** 2 / X.shape[-2] + lam


# -- methods: (data, lam) ↦ w* differentiable in lam -------------------------------------
def ours(kind: str, **options):
    solver = options.pop("solver", None)
    adjoint = options.pop("adjoint", None)
    layer = il.ArgminLayer(inner_objective(kind), solver=solver, adjoint=adjoint)

    def solve(data, lam):
        return layer((data["X"], data["t"], lam), torch.zeros_like(data["X"][:, 0]))

    solve.layer = layer
    return solve


def unrolled(kind: str, steps: int, method: str):
    f = inner_objective(kind)

    def grad(w, x):
        return torch.autograd.grad(f(x, w).sum(), w, create_graph=True)[0]

    def solve(data, lam):
        x = (data["X"], data["t"], lam)
        w = torch.zeros_like(data["X"][:, 0]).requires_grad_()
        g = grad(w, x)
        if method == "gd":
            step = 1 / hessian_bound(kind, data, lam.detach())[:, None]
            for _ in range(steps):
                w = w - step * g
                g = grad(w, x)
            return w
        pairs = []
        for _ in range(steps):
            d = -_two_loop(g, pairs) if pairs else -g / hessian_bound(kind, data, lam.detach())[:, None]
            w_new = w + _armijo_step(f, x, w.detach(), g.detach(), d.detach())[:, None] * d
            g_new = grad(w_new, x)
            pairs = (pairs + [(w_new - w, g_new - g)])[-10:]
            w, g = w_new, g_new
        return w

    return solve


def _armijo_step(f, x, w, g, d, shrink: float = 0.5, tries: int = 30):
    """Per-sample step ``t ∈ {1, ½, …}`` with sufficient decrease, chosen on detached values
    (a constant of the unrolled graph, as in unrolled solvers with a line search)."""
    with torch.no_grad():
        f0, slope = f(x, w), (g * d).sum(-1)
        t = torch.ones_like(f0)
        done = torch.zeros_like(f0, dtype=torch.bool)
        for _ in range(tries):
            ok = f(x, w + t[:, None] * d) <= f0 + 1e-4 * t * slope
            done = done | ok
            if bool(done.all()):
                break
            t = torch.where(done, t, shrink * t)
    return t


def _two_loop(g, pairs):
    """L-BFGS direction ``H g`` from curvature pairs; a sample's pair with ``sᵀy ≤ 0`` (or
    vanishing, once it has converged) is skipped for that sample (differentiable: no in-place
    updates)."""
    def rho(s, y):
        sy = (s * y).sum(-1, keepdim=True)
        ok = sy > 1e-300
        return torch.where(ok, 1 / torch.where(ok, sy, torch.ones_like(sy)), torch.zeros_like(sy))

    q, alphas = g, []
    for s, y in reversed(pairs):
        a = rho(s, y) * (s * q).sum(-1, keepdim=True)
        q = q - a * y
        alphas.append(a)
    s, y = pairs[-1]
    yy = (y * y).sum(-1, keepdim=True)
    gamma = torch.where(rho(s, y) > 0, (s * y).sum(-1, keepdim=True) / yy.clamp_min(1e-300), 1.0)
    r = gamma * q
    for (s, y), a in zip(pairs, reversed(alphas)):
        b = rho(s, y) * (y * r).sum(-1, keepdim=True)
        r = r + (a - b) * s
    return r


def torch_lbfgs(f, x, w0, tol: float, max_iter: int):
    """``torch.optim.LBFGS`` (strong Wolfe) on the batch's summed objective, stopped when the
    largest gradient entry is below ``tol`` (its criterion, over the whole batch)."""
    w = w0.detach().clone().requires_grad_()
    opt = torch.optim.LBFGS([w], lr=1, max_iter=max_iter, tolerance_grad=tol,
                            tolerance_change=0.0, history_size=10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = f(x, w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach()


def torchopt_root(kind: str, solve_name: str, forward: str = "ours"):
    from torchopt import linear_solve
    from torchopt.diff.implicit import custom_root

    f = inner_objective(kind)
    linear = {"default": linear_solve.solve_normal_cg(),
              "cg": linear_solve.solve_cg(rtol=1e-12, maxiter=1000),
              "inv": linear_solve.solve_inv()}[solve_name]

    def optimality(w, lam, X, t):
        return torch.func.grad(lambda w: f((X, t, lam), w).sum())(w)

    @custom_root(optimality, argnums=1, solve=linear)
    def solver_fn(w0, lam, X, t):
        if forward == "torch_lbfgs":
            return torch_lbfgs(f, (X, t, lam.detach()), w0, tol=1e-12, max_iter=2000)
        problem = RootProblem(lambda w: optimality(w, lam, X, t), objective=lambda w: f((X, t, lam), w))
        return il.LBFGS().solve(problem, w0).y  # the same forward solve as ours

    def solve(data, lam):
        return solver_fn(torch.zeros_like(data["X"][:, 0]), lam, data["X"], data["t"])

    return solve


def methods(kind: str, cfg) -> dict:
    out = {"ours": ours(kind), "ours_cg": ours(kind, adjoint=il.HessianAdjoint("cg")),
           "ours_newton_cg": ours(kind, solver=il.NewtonCG()),
           "ours_tol1e-6": ours(kind, solver=il.LBFGS(tol=1e-6, rtol=1e-6))}
    for K in cfg.unroll_steps:
        out[f"unrolled_gd_{K}"] = unrolled(kind, K, "gd")
        out[f"unrolled_lbfgs_{K}"] = unrolled(kind, K, "lbfgs")
    for name in cfg.torchopt_solves:
        out[f"torchopt_{name}"] = torchopt_root(kind, name)
    out["torchopt_cg_torch_lbfgs"] = torchopt_root(kind, "cg", forward="torch_lbfgs")
    return out


def _measure(kind: str, fns: dict, data, lam, rounds: int) -> dict:
    def fwd_bwd(fn, clock=None):
        lam_ = lam.clone().requires_grad_()
        loss = outer_loss(kind, data, fn(data, lam_))
        if clock is not None:
            clock.append(time.perf_counter())
        return torch.autograd.grad(loss, lam_)[0]

    times = {k: [] for k in fns}
    for r in range(rounds + 1):  # round 0 warms up
        for k, fn in fns.items():
            clock = [time.perf_counter()]
            fwd_bwd(fn, clock)
            clock.append(time.perf_counter())
            if r > 0:
                times[k].append((clock[1] - clock[0], clock[2] - clock[0]))
    ref = reference_gradient(kind, data, lam)
    out = {}
    for k, fn in fns.items():
        g = fwd_bwd(fn)
        saved = saved_tensor_bytes(lambda fn=fn: fn(data, lam.clone().requires_grad_()))
        layer = getattr(fn, "layer", None)
        iters = int(layer.stats.forward.iterations.max()) if layer is not None else None
        err = float((g - ref).abs().max())
        out[k] = {"fwd_ms": 1e3 * statistics.median(t[0] for t in times[k]),
                  "bwd_ms": 1e3 * statistics.median(t[1] - t[0] for t in times[k]),
                  "fwd_bwd_ms": 1e3 * statistics.median(t[1] for t in times[k]), "saved_MB": saved / MB,
                  "grad_err_abs": err, "grad_err_rel": err / float(ref.abs().max()),
                  "forward_iterations": iters}
    return out


def main(cfg) -> list[dict]:
    torch.set_num_threads(int(cfg.threads))
    steady = steady_malloc() if cfg.steady_malloc else False
    rows = []
    for kind in cfg.problems:
        data, lam = make_problem(kind, cfg.batch, cfg.n_samples, cfg.n_features, cfg.seed,
                                 cfg.feature_scale_decades, cfg.penalty_range)
        results = _measure(kind, methods(kind, cfg), data, lam, cfg.rounds)
        ours_r, best = results["ours"], results["ours_newton_cg"]
        for name, r in results.items():
            peer = not name.startswith("ours")

            def vs(mine: dict, key: str, r=r, peer=peer):
                return ratio(mine[key], r[key]) if peer else None

            rows.append({
                "problem": f"{kind} B={cfg.batch} n={cfg.n_samples} d={cfg.n_features} f64",
                "method": name, **r,
                "time_ratio_ours/this": vs(ours_r, "fwd_bwd_ms"),
                "time_ratio_ours_newton_cg/this": vs(best, "fwd_bwd_ms"),
                "bwd_ratio_ours/this": vs(ours_r, "bwd_ms"),
                "memory_ratio_ours/this": vs(ours_r, "saved_MB"),
                "steady_malloc": steady,
            })
    return rows
