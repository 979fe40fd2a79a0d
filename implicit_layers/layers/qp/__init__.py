"""Inequality-constrained QP layers (OptNet class) and the cvxpy front door."""

from implicit_layers.layers.qp.layer import QPLayer

__all__ = ["QPLayer"]
