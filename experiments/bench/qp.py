"""Benchmark ``qp``: QPLayer (interior point) against proxsuite, qpth and cvxpylayers, in one process.

Random batches of strictly complementary QPs with a known solution (float64). Timed: the
forward call and the forward + backward of ``L = ⟨x̄, x*⟩``, every method once per round,
rounds interleaved (:func:`experiments.bench.harness.interleaved_medians`), medians reported
with the ratio ours/theirs. Accuracy of every method (:mod:`experiments.bench.qp_reference`):
``x_err`` against Clarabel at tight tolerances, ``c_grad_err_rel`` and ``grad_err_rel`` against
an exact active-set solve verified by finite differences.

Cases (``cases=[...]``, each with its own settings and ``methods``):

* ``main``: issue 12's benchmark problem (n = 100, m = 100 inequalities, p = 20 equalities)
  at each of ``batch_sizes``; the batches above the smallest run ``large_batch_methods`` for
  ``large_batch_rounds`` rounds (cvxpylayers takes seconds there).
* ``small``: ``B = batch_size``, ``m = n``, ``p = n / 5`` for each ``n`` of ``sizes``: where a
  batched torch solver meets a compiled per-sample one.
* ``two_sided``: ``lower ≤ Gx ≤ h`` with both sides active somewhere; ``ours`` is the native
  form, ``ours_stacked`` our layer on ``[G; −G] x ≤ [h; −lower]`` (its ratio is native/stacked).

Methods (:mod:`experiments.bench.qp_peers`): ``ours`` (defaults), ``ours_primal``
(``kkt_form="primal"``), ``ours_all_cores`` (one torch thread per core, as diffcp's process
pool uses every core), ``ours_stacked``, ``qpth``, ``proxsuite_NAME`` and ``cvxpylayers_NAME``
for each entry of ``proxsuite_variants`` / ``cvxpylayers_variants`` (keyword arguments of
``QPFunction`` / ``solver_args`` of ``CvxpyLayer``). ``steady_malloc`` as in
:func:`experiments.bench.harness.steady_malloc`.
"""

from __future__ import annotations

import os

import torch

from experiments.bench import qp_peers as peers
from experiments.bench.harness import interleaved_medians, ratio, steady_malloc
from experiments.bench.qp_reference import NAMES, accuracy, clarabel_solutions, fd_check
from implicit_layers.testing.qp_problems import (
    active_set_gradients,
    strictly_complementary_qp,
    two_sided_gradients,
    two_sided_qp,
)

OURS = {"ours": {}, "ours_primal": {"kkt_form": "primal"}, "ours_stacked": {"stack": True},
        "ours_all_cores": {"threads": os.cpu_count()}}


def make_methods(names, cfg, n: int, m: int, p: int) -> dict:
    """The named methods (module docstring) for problems of this size."""
    methods = {}
    for name in names:
        kind, _, variant = name.partition("_")
        if name in OURS:
            methods[name] = peers.ours(**OURS[name])
        elif name == "qpth":
            methods[name] = peers.qpth()
        elif kind == "proxsuite" and variant in cfg.proxsuite_variants:
            methods[name] = peers.proxsuite(**cfg.proxsuite_variants[variant])
        elif kind == "cvxpylayers" and variant in cfg.cvxpylayers_variants:
            methods[name] = peers.cvxpylayers(n, m, p, dict(cfg.cvxpylayers_variants[variant]))
        else:
            raise ValueError(f"unknown qp benchmark method {name!r}")
    if "ours" not in methods:
        raise ValueError("every case needs the method 'ours' (the ratios refer to it)")
    return methods


def problem(B: int, n: int, m: int, p: int, seed: int, two_sided: bool = False):
    """``data = (Q, c, A, b, G, lower, h)`` (``lower`` None if one-sided), the known ``x*``,
    the cotangent ``x̄`` and the reference gradients (``None`` for an absent ``lower``)."""
    x_bar = torch.randn(B, n, generator=torch.Generator().manual_seed(seed + 2), dtype=torch.float64)
    if two_sided:
        data, (x, lam, mu) = two_sided_qp(batch=(B,), n=n, m=m, p=p, seed=seed)
        return data, x, x_bar, two_sided_gradients(*data, x, lam, mu, x_bar)
    (Q, c, A, b, G, h), (x, lam, mu) = strictly_complementary_qp(batch=(B,), n=n, m=m, p=p, seed=seed)
    Q_bar, c_bar, A_bar, b_bar, G_bar, h_bar = active_set_gradients(Q, c, A, b, G, h, x, lam, mu, x_bar)
    return (Q, c, A, b, G, None, h), x, x_bar, (Q_bar, c_bar, A_bar, b_bar, G_bar, None, h_bar)


def measure(methods: dict, data, x_bar, rounds: int) -> tuple[dict, dict]:
    """Forward and forward+backward medians (interleaved rounds); each method's last solution
    and gradients."""
    inputs = {k: [None if t is None else t.clone().requires_grad_() for t in data] for k in methods}
    solutions = {}

    def fwd_bwd(k):
        for t in inputs[k]:
            if t is not None:
                t.grad = None
        (methods[k](*inputs[k]) * x_bar).sum().backward()

    def fwd(k):
        with torch.no_grad():
            solutions[k] = methods[k](*data)

    calls = {}
    for k in methods:
        calls[(k, "forward_s")] = lambda k=k: fwd(k)
        calls[(k, "fwd_bwd_s")] = lambda k=k: fwd_bwd(k)
    times = interleaved_medians(calls, rounds)
    grads = {k: [None if t is None else t.grad for t in inputs[k]] for k in methods}
    return times, {k: (solutions[k], grads[k]) for k in methods}


def run_case(label: str, methods: dict, B: int, n: int, m: int, p: int, cfg, rounds: int,
             two_sided: bool = False) -> list[dict]:
    """One table block: every method on one batch, timed and checked."""
    data, x_known, x_bar, ref = problem(B, n, m, p, int(cfg.seed), two_sided)
    x_ref = clarabel_solutions(*data)
    checks = {"reference_x_err": float((x_ref - x_known).abs().max()),
              "reference_fd_rel_err": fd_check(data, x_bar, ref)}
    times, outputs = measure(methods, data, x_bar, rounds)
    rows = []
    for k, (x, grads) in outputs.items():
        compared = NAMES if not k.startswith("cvxpylayers") else NAMES[1:]  # their Q-gradient goes to L
        fwd, both = times[(k, "forward_s")], times[(k, "fwd_bwd_s")]
        peer = k != "ours"
        rows.append({
            "case": label, "method": k, "forward_s": fwd, "fwd_bwd_s": both,
            **accuracy(x, grads, x_ref, ref, compared),
            "fwd_ratio_ours/theirs": ratio(times[("ours", "forward_s")], fwd) if peer else None,
            "fwd_bwd_ratio_ours/theirs": ratio(times[("ours", "fwd_bwd_s")], both) if peer else None,
            **checks})
    return rows


def main(cfg) -> list[dict]:
    torch.set_num_threads(int(cfg.threads))
    steady = steady_malloc() if cfg.steady_malloc else False
    unknown = set(cfg.cases) - {"main", "small", "two_sided"}
    if unknown:
        raise ValueError(f"unknown qp benchmark cases {sorted(unknown)}: main, small, two_sided")
    rows = []
    if "main" in cfg.cases:
        c = cfg.main
        for B in c.batch_sizes:
            large = B > min(c.batch_sizes)
            methods = make_methods(c.large_batch_methods if large else c.methods, cfg, c.n, c.m, c.p)
            rows += run_case(f"B={B} n={c.n} m={c.m} p={c.p} f64", methods, B, c.n, c.m, c.p, cfg,
                             int(cfg.large_batch_rounds if large else cfg.rounds))
    if "small" in cfg.cases:
        c = cfg.small
        for n in c.sizes:
            m, p = n, n // 5
            rows += run_case(f"small B={c.batch_size} n={n} m={m} p={p} f64",
                             make_methods(c.methods, cfg, n, m, p), c.batch_size, n, m, p, cfg,
                             int(cfg.rounds))
    if "two_sided" in cfg.cases:
        c = cfg.two_sided
        rows += run_case(f"two-sided B={c.batch_size} n={c.n} m={c.m} p={c.p} f64",
                         make_methods(c.methods, cfg, c.n, 2 * c.m, c.p), c.batch_size, c.n, c.m,
                         c.p, cfg, int(cfg.rounds), two_sided=True)
    for row in rows:
        row["steady_malloc"] = steady
    return rows
