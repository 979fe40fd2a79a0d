"""Functional forms of the layers: thin wrappers that build a layer and call it once."""

from __future__ import annotations

# --- core (issue 2) ---
# --- layers: equality QP (issue 3) ---
def eq_qp(Q, c, A, b, *, backend="auto"):
    """``min ½xᵀQx + cᵀx s.t. Ax = b`` -> ``(x, λ)``; see :class:`EqualityQPLayer`."""
    from implicit_layers.layers.eq_qp import EqualityQPLayer

    return EqualityQPLayer(backend)(Q, c, A, b)


# --- layers: Lyapunov (issue 4) ---
# --- layers: DEQ (issue 5) ---
# --- layers: QP (issue 7) ---
