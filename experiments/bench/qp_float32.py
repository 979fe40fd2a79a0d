"""Benchmark ``qp_float32``: how far float32 gradients of QPLayer are from float64 ones.

For each case ``[B, n, m]`` (strictly complementary random QPs, data rounded to float32,
the float64 reference solving the same rounded data; :mod:`implicit_layers.testing.qp_float32`):
the per-sample relative error ``‖g₃₂ − g₆₄‖/‖g₆₄‖`` of the gradient of ``⟨x̄, x*⟩`` in
``(Q, c, G, h)`` and of the JVP of ``x*``, median and worst, for each backend, beside the
floor: the exact active-set derivative system solved in float32 by ``torch.linalg.solve``
on the true active set, at the float64 solution rounded to float32. Also the time of one
float32 forward+backward call per backend (a single measurement: this is an accuracy report).
"""

from __future__ import annotations

import time

import torch

import implicit_layers as il
from implicit_layers.testing.qp_float32 import (
    float32_problems,
    floor_gradients,
    layer_gradients,
    layer_tangents,
    reference_gradients,
    relative,
)

METHODS = {
    "ours (InteriorPoint, default: float64 computation)": lambda: il.InteriorPoint(),
    "ours (InteriorPoint, kkt_form=primal)": lambda: il.InteriorPoint(kkt_form="primal"),
    "ours (InteriorPoint, dtype=None: float32 iterations)": lambda: il.InteriorPoint(dtype=None),
    "ours (OSQP)": lambda: il.OSQP(),
}


def main(cfg) -> list[dict]:
    torch.set_num_threads(int(cfg.threads))
    rows = []
    for B, n, m in cfg.cases:
        data32, data64, x_bar32, x_bar64 = float32_problems(batch=B, n=n, m=m, seed=cfg.seed)
        exact = il.QPLayer(solver=il.InteriorPoint(tol=1e-12))
        ref = reference_gradients(data64, x_bar64, exact)
        gen = torch.Generator().manual_seed(cfg.seed + 5)
        tangents = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in data64]
        tangents[0] = tangents[0] + tangents[0].mT
        ref_tangent = layer_tangents(exact, data64, tangents)
        case = f"B={B} n={n} m={m} p=0"
        floor = relative(floor_gradients(data32, data64, x_bar32, exact), ref)
        rows.append({"case": case, "method": "floor (exact active-set solve in float32)",
                     "grad_err_median": float(floor.median()), "grad_err_worst": float(floor.max()),
                     "jvp_err_median": None, "jvp_err_worst": None, "solved": None,
                     "fwd_bwd_s": None})
        for name, solver in METHODS.items():
            layer = il.QPLayer(solver=solver(), on_failure="warn")
            t0 = time.perf_counter()
            grads = layer_gradients(layer, data32, x_bar32)
            elapsed = time.perf_counter() - t0
            solved = int((layer.stats.forward.extra["status"] == il.QPStatus.SOLVED).sum())
            g_err = relative(grads, ref)
            t_err = relative(layer_tangents(layer, data32, [t.float() for t in tangents]), ref_tangent)
            rows.append({"case": case, "method": name,
                         "grad_err_median": float(g_err.median()), "grad_err_worst": float(g_err.max()),
                         "jvp_err_median": float(t_err.median()), "jvp_err_worst": float(t_err.max()),
                         "solved": f"{solved}/{B}", "fwd_bwd_s": elapsed})
    return rows
