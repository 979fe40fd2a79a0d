"""Equality-constrained QP layers and their backends (dense, sparse, OSQP)."""

from implicit_layers.layers.eq_qp.dense import DenseKKTBackend
from implicit_layers.layers.eq_qp.layer import EqualityQPLayer
from implicit_layers.layers.eq_qp.osqp import OSQPBackend
from implicit_layers.layers.eq_qp.sparse import SparseKKTBackend

__all__ = ["EqualityQPLayer", "DenseKKTBackend", "SparseKKTBackend", "OSQPBackend"]
