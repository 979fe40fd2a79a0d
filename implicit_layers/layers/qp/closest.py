"""Infeasible QPs solved as the closest feasible QP (``QPLayer(infeasible="closest")``).

proxsuite's definition: for a sample whose constraints admit no ``x``, the least-norm shift

    s* = argmin ½‖s‖²   s.t.   ∃x:  Ax = b + s_E,   l − s_L ≤ Gx ≤ u + s_U

(:mod:`implicit_layers.solvers.qp.feasibility`) makes them feasible, and the layer returns the
solution of the QP with the shifted constraints. Both stages are QPs solved by the layer's
own implicit function, composed with autograd, so the gradient is that of the whole map
``θ ↦ x*(θ, s*(θ))``: the shift's own dependence on ``(A, b, G, l, u)`` included. The
phase-one QP's ``x`` need not be unique, but its shift is, and the cotangent reaches only the
shift, a right-hand side its derivative system solves consistently.

Feasible samples are untouched: the batch is solved once as usual, and only the infeasible
samples are solved again, as a sub-batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from implicit_layers.solvers.qp import QPStatus
from implicit_layers.solvers.qp.feasibility import phase_one_data
from implicit_layers.stats import LayerStats


def flat_samples(inputs, event_ndims, batch, idx: Tensor) -> tuple[Tensor, ...]:
    """The inputs of the samples ``idx`` of the flattened ``batch``, differentiably."""
    B = batch.numel()
    out = []
    for t, e in zip(inputs, event_ndims, strict=True):
        ev = t.shape[t.ndim - e:]
        out.append(t.expand(*batch, *ev).reshape(B, *ev).index_select(0, idx))
    return tuple(out)


def resolve_closest(layer, inputs, event_ndims, y: Tensor, idx: Tensor) -> Tensor:
    """``y`` with the samples ``idx`` (infeasible) replaced by their closest feasible QP's
    solution; ``layer.stats`` describe the whole batch afterwards (status
    ``CLOSEST_FEASIBLE``, the shift in ``stats.forward.extra["shift"]``)."""
    Q, c, A, b, G, lower, upper = flat_samples(inputs, event_ndims, y.shape[:-1], idx)
    n, p = c.shape[-1], A.shape[-2]
    first = layer.stats
    m = G.shape[-2]
    shift = layer._solve_qp(phase_one_data(Q, A, b, G, lower, upper), closest=False)
    shift = shift[..., n:n + p + 2 * m]  # the phase-one QP's unknowns are (x, s)
    s_e, s_u, s_l = shift[..., :p], shift[..., p:p + m], shift[..., p + m:]
    solution = layer._solve_qp((Q, c, A, b + s_e, G, lower - s_l, upper + s_u), closest=False)
    second = layer.stats
    layer.stats = _merged(first, second, idx, shift.detach(), y.shape[:-1])
    flat = y.reshape(-1, y.shape[-1])
    return flat.index_copy(0, idx, solution).reshape(y.shape)


def _merged(first: LayerStats, second: LayerStats, idx: Tensor, shift: Tensor, batch) -> LayerStats:
    """The first solve's stats with the re-solved samples' entries from the second, their
    status ``CLOSEST_FEASIBLE`` where the shifted QP was solved."""
    fwd, sub = first.forward, second.forward
    assert fwd is not None and sub is not None, "both forward solves ran"
    flat = lambda t: t.reshape(-1, *t.shape[len(batch):])  # noqa: E731
    for name in ("iterations", "residual", "converged"):
        merged = flat(getattr(fwd, name)).clone()
        merged[idx] = getattr(sub, name).to(merged.dtype)
        setattr(fwd, name, merged.reshape(getattr(fwd, name).shape))
    status = flat(fwd.extra["status"]).clone()
    solved = sub.extra["status"] == QPStatus.SOLVED
    status[idx] = torch.where(solved, QPStatus.CLOSEST_FEASIBLE, sub.extra["status"])
    fwd.extra["status"] = status.reshape(fwd.extra["status"].shape)
    shifts = shift.new_zeros(flat(fwd.extra["status"]).shape[0], shift.shape[-1])
    shifts[idx] = shift
    fwd.extra["shift"] = shifts.reshape(*batch, shift.shape[-1])
    return LayerStats(forward=fwd, backward=second.backward, tangent=second.tangent)
