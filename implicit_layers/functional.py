"""Functional forms of the layers: thin wrappers that build a layer and call it once."""

from __future__ import annotations

# --- core (issue 2) ---
# --- layers: equality QP (issue 3) ---
# --- layers: Lyapunov (issue 4) ---
from implicit_layers.layers.lyapunov import discrete_lyapunov, lyapunov  # noqa: F401
from implicit_layers.layers.sylvester import sylvester  # noqa: F401
# --- layers: DEQ (issue 5) ---
# --- layers: QP (issue 7) ---
