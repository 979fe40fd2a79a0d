"""Benchmark: EqualityQPLayer forward + backward against the peers, in one process.

Dense cases (B, n, m), float64, CPU: ours (Cholesky + Schur complement, factorization
reused) against (a) ``torch.linalg.solve`` on the assembled KKT matrix with plain autograd,
(b) qpth (with one dummy inequality 0ᵀx ≤ 1, since it needs one), (c) cvxpylayers (Q passed
through its Cholesky factor, as DPP requires). The loss is ⟨g, x⟩ with a fixed random g;
gradient errors are relative to a float64 NumPy reference (explicit KKT solves) over the
inputs each method can differentiate. Sparse case: ours (sparse LDLᵀ) forward + backward
against OSQP's forward solve alone (setup + solve, default and tight tolerances).

``steady_malloc: true`` (glibc only) keeps freed memory in the process for the whole run.
By default glibc maps each large temporary afresh (or trims the heap back) on every call, and
the page faults of touching it again (~30 MB per call at B=32, n=200) made single timings
swing by up to 2× with the order the methods ran in; with it the timings are the methods'
compute. It applies to every method alike; ``steady_malloc=false`` measures the default.
"""

from __future__ import annotations

import warnings

import numpy as np
import osqp
import scipy.sparse as sp
import torch

import implicit_layers as il
from experiments.bench.harness import ratio, steady_malloc, timeit

DT = torch.float64


def make_problem(B, n, m, seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(B, n, n, generator=g, dtype=DT)
    Q = X @ X.mT / n + 0.1 * torch.eye(n, dtype=DT)
    A = torch.randn(B, m, n, generator=g, dtype=DT)
    c, b = torch.randn(B, n, generator=g, dtype=DT), torch.randn(B, m, generator=g, dtype=DT)
    weight = torch.randn(B, n, generator=g, dtype=DT)
    return (Q, c, A, b), weight


def reference_grads(Q, c, A, b, weight):
    """float64 NumPy: x from the KKT system, then w = K⁻¹(g; 0) and the pullback formulas."""
    out = {k: [] for k in "QcAb"}
    for Qk, ck, Ak, bk, gk in zip(*(t.numpy() for t in (Q, c, A, b, weight)), strict=True):
        n, m = Qk.shape[0], Ak.shape[0]
        K = np.block([[Qk, Ak.T], [Ak, np.zeros((m, m))]])
        z = np.linalg.solve(K, np.concatenate([-ck, bk]))
        w = np.linalg.solve(K, np.concatenate([gk, np.zeros(m)]))
        x, lam, wx, wl = z[:n], z[n:], w[:n], w[n:]
        out["Q"].append(-(np.outer(wx, x) + np.outer(x, wx)) / 2)
        out["c"].append(-wx)
        out["A"].append(-(np.outer(wl, x) + np.outer(lam, wx)))
        out["b"].append(wl)
    return {k: torch.as_tensor(np.array(v)) for k, v in out.items()}


def ours_solver():
    layer = il.EqualityQPLayer("dense")  # built once, like the cvxpylayers layer

    def solve(Q, c, A, b):
        return layer(Q, c, A, b)[0]

    return solve


def kkt_solve_autograd(Q, c, A, b):
    n, m = Q.shape[-1], A.shape[-2]
    K = torch.cat([torch.cat([Q, A.mT], -1),
                   torch.cat([A, A.new_zeros(*A.shape[:-2], m, m)], -1)], -2)
    z = torch.linalg.solve(K, torch.cat([-c, b], -1))
    return z[..., :n]


def qpth_solve(Q, c, A, b):
    from qpth.qp import QPFunction

    B, n = c.shape
    G, h = Q.new_zeros(B, 1, n), Q.new_ones(B, 1)
    return QPFunction(verbose=-1, eps=1e-12, maxIter=50)(Q, c, G, h, A, b)


def cvxpylayers_solver(n, m):
    import cvxpy as cp
    from cvxpylayers.torch import CvxpyLayer

    L, cc, AA, bb = cp.Parameter((n, n)), cp.Parameter(n), cp.Parameter((m, n)), cp.Parameter(m)
    x = cp.Variable(n)
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(L.T @ x) + cc @ x), [AA @ x == bb])
    layer = CvxpyLayer(prob, parameters=[L, cc, AA, bb], variables=[x])

    def solve(Q, c, A, b):  # Q enters through its Cholesky factor (no gradient compared)
        return layer(torch.linalg.cholesky(Q.detach()), c, A, b)[0]

    return solve


def measure(fn, inputs, weight, ref, repeat, names="QcAb"):
    leaves = [t.clone().requires_grad_(k in names) for k, t in zip("QcAb", inputs, strict=True)]

    def step():
        for t in leaves:
            t.grad = None
        (fn(*leaves) * weight).sum().backward()

    seconds = timeit(step, repeat=repeat, warmup=1)
    step()
    grads = {k: t.grad for k, t in zip("QcAb", leaves, strict=True) if k in names}
    if "Q" in grads:  # plain autograd on an unsymmetrized Q gives −w_x xᵀ: compare sym parts
        grads["Q"] = (grads["Q"] + grads["Q"].mT) / 2
    err = max(float((g - ref[k]).abs().max() / ref[k].abs().max()) for k, g in grads.items())
    return seconds, err


def dense_rows(cfg) -> list[dict]:
    rows = []
    for B, n, m in cfg.cases:
        inputs, weight = make_problem(B, n, m, cfg.seed)
        ref = reference_grads(*inputs, weight)
        t_ours, e_ours = measure(ours_solver(), inputs, weight, ref, cfg.repeat)
        t_kkt, e_kkt = measure(kkt_solve_autograd, inputs, weight, ref, cfg.repeat)
        row = {"case": f"B={B} n={n} m={m}", "ours_s": t_ours, "ours_grad_err": e_ours,
               "kkt_solve_s": t_kkt, "kkt_solve_grad_err": e_kkt,
               "ours/kkt_solve": ratio(t_ours, t_kkt)}
        if cfg.qpth:
            t_q, e_q = measure(qpth_solve, inputs, weight, ref, cfg.repeat)
            row.update(qpth_s=t_q, qpth_grad_err=e_q, **{"ours/qpth": ratio(t_ours, t_q)})
        if cfg.cvxpylayers and n <= cfg.cvxpylayers_max_n:
            solve = cvxpylayers_solver(n, m)
            t_c, e_c = measure(solve, inputs, weight, ref, cfg.cvxpylayers_repeat, names="cAb")
            row.update(cvxpylayers_s=t_c, cvxpylayers_grad_err=e_c,
                       **{"ours/cvxpylayers": ratio(t_ours, t_c)})
        rows.append(row)
    return rows


def banded_problem(n, m, seed):
    rng = np.random.default_rng(seed)
    Q = sp.diags([-np.ones(n - 1), 3 + rng.uniform(0, 1, n), -np.ones(n - 1)], [-1, 0, 1])
    cols = ((np.arange(m) * (n - 3)) // (m - 1))[:, None] + np.arange(3)
    A = sp.csr_matrix((rng.standard_normal(3 * m), (np.repeat(np.arange(m), 3), cols.ravel())),
                      shape=(m, n))
    return sp.csc_matrix(Q), rng.standard_normal(n), sp.csc_matrix(A), rng.standard_normal(m)


def sparse_row(cfg) -> dict:
    n, m = cfg.sparse_n, cfg.sparse_m
    Q, c, A, b = banded_problem(n, m, cfg.seed)
    Qt = torch.sparse_coo_tensor(np.vstack(Q.nonzero()), Q[Q.nonzero()].A1, (n, n)).coalesce()
    At = torch.sparse_coo_tensor(np.vstack(A.nonzero()), A[A.nonzero()].A1, (m, n)).coalesce()
    ct, bt = torch.tensor(c), torch.tensor(b)
    weight = torch.randn(n, generator=torch.Generator().manual_seed(cfg.seed), dtype=DT)
    layer = il.EqualityQPLayer("sparse")

    def ours_step():
        leaves = [t.detach().clone().requires_grad_() for t in (Qt, ct, At, bt)]
        x, _ = layer(*leaves)
        (x * weight).sum().backward()
        return leaves

    def osqp_forward(**eps):
        def run():
            s = osqp.OSQP()
            s.setup(sp.triu(Q, format="csc"), c, A, b, b, verbose=False, **eps)
            return s.solve()
        return run

    t_ours = timeit(ours_step, repeat=cfg.repeat)
    t_osqp = timeit(osqp_forward(), repeat=cfg.repeat)
    t_tight = timeit(osqp_forward(eps_abs=1e-8, eps_rel=1e-8), repeat=cfg.repeat)
    leaves = ours_step()
    # gradient check through the adjoint KKT residual: c̄ = −w_x, b̄ = w_λ with K w = (g; 0)
    wx, wl = -leaves[1].grad.numpy(), leaves[3].grad.numpy()
    g = weight.numpy()
    adj_res = max(np.abs(Q @ wx + A.T @ wl - g).max(), np.abs(A @ wx).max()) / np.abs(g).max()
    return {"case": f"sparse n={n} m={m}", "ours_s": t_ours, "ours_grad_err": float(adj_res),
            "osqp_forward_s": t_osqp, "ours/osqp_forward": ratio(t_ours, t_osqp),
            "osqp_forward_tight_s": t_tight, "ours/osqp_forward_tight": ratio(t_ours, t_tight)}


def main(cfg) -> list[dict]:
    torch.set_num_threads(cfg.threads)
    warnings.filterwarnings("ignore")  # peers' deprecation chatter
    steady = steady_malloc() if cfg.steady_malloc else False
    rows = dense_rows(cfg) + [sparse_row(cfg)]
    for row in rows:
        row["steady_malloc"] = steady
    return rows
