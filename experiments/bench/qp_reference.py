"""References and accuracy measures of the ``qp`` benchmark.

* ``x_ref``: each sample solved by Clarabel through cvxpy at tight tolerances, once per case
  (:func:`clarabel_solutions`); its distance to the generator's known solution is reported
  beside it as a check of the reference.
* gradients of ``⟨x̄, x*⟩``: the exact active-set solve of
  :mod:`implicit_layers.testing.qp_problems`, itself checked against central differences of the
  solution map (:func:`fd_check`).
"""

from __future__ import annotations

import numpy as np
import torch

import implicit_layers as il

NAMES = ("Q", "c", "A", "b", "G", "lower", "h")
#: Clarabel's tolerances for the reference solutions
TIGHT = {"tol_gap_abs": 1e-12, "tol_gap_rel": 1e-12, "tol_feas": 1e-12, "tol_ktratio": 1e-10}


def clarabel_solutions(Q, c, A, b, G, lower, h) -> torch.Tensor:
    """``x*`` of every sample by Clarabel (through cvxpy, tolerances :data:`TIGHT`)."""
    import cvxpy as cp

    xs = []
    for i in range(len(c)):
        Qi, ci, Ai, bi, Gi, hi = (t[i].numpy() for t in (Q, c, A, b, G, h))
        x = cp.Variable(len(ci))
        constraints = [Ai @ x == bi, Gi @ x <= hi]
        if lower is not None:
            constraints.append(Gi @ x >= lower[i].numpy())
        prob = cp.Problem(cp.Minimize(0.5 * cp.quad_form(x, cp.psd_wrap(Qi)) + ci @ x), constraints)
        prob.solve(solver=cp.CLARABEL, **TIGHT)
        if prob.status != cp.OPTIMAL:
            raise RuntimeError(f"Clarabel reference for sample {i}: {prob.status}")
        xs.append(x.value)
    return torch.as_tensor(np.stack(xs), dtype=c.dtype)


def fd_check(data, x_bar, ref, eps: float = 1e-6) -> float:
    """Relative error of the reference gradient's directional derivative (first sample, one
    random direction in every input) against central differences of a tight solve."""
    data, x_bar = [None if t is None else t[:1] for t in data], x_bar[:1]
    gen = torch.Generator().manual_seed(1)
    dirs = [None if t is None else torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in data]
    dirs[0] = dirs[0] + dirs[0].mT
    layer = il.QPLayer(solver=il.InteriorPoint(tol=1e-13))

    def f(s):
        Q, c, A, b, G, lower, h = (t if t is None else t + s * d for t, d in zip(data, dirs, strict=True))
        return (layer(Q, c, A, b, G, h, lower=lower)[0] * x_bar).sum()

    fd = (f(eps) - f(-eps)) / (2 * eps)
    an = sum((g[:1] * d).sum() for g, d in zip(ref, dirs, strict=True) if g is not None)
    return float((fd - an).abs() / an.abs().clamp_min(1e-12))


def accuracy(x, grads, x_ref, ref, compared=NAMES) -> dict[str, float]:
    """``x_err``: max over samples of ``‖x − x_ref‖∞``; ``c_grad_err_rel``: max over samples of
    ``‖c̄ − c̄_ref‖∞ / ‖c̄_ref‖∞``; ``grad_err_rel``: the largest error over every compared input
    (``compared``: their names) relative to the largest reference gradient entry."""
    c_err = (grads[1] - ref[1]).abs().amax(-1) / ref[1].abs().amax(-1)
    scale = max(float(g.abs().max()) for g in ref if g is not None)
    errs = [float((g - r).abs().max()) for g, r, name in zip(grads, ref, NAMES, strict=True)
            if r is not None and name in compared]
    return {"x_err": float((x - x_ref).abs().max()), "c_grad_err_rel": float(c_err.max()),
            "grad_err_rel": max(errs) / scale}
