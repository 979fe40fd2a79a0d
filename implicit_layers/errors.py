"""Exceptions and warnings raised by implicit_layers.

Every failure that is specific to implicit layers subclasses :class:`ImplicitLayerError`.
Malformed input (wrong shape, dtype or non-finite values) raises the built-in ``ValueError``
with the offending argument named in the message.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class ImplicitLayerError(RuntimeError):
    """Base class of every error specific to implicit layers."""


class ConvergenceError(ImplicitLayerError):
    """A forward or adjoint solve did not reach its tolerance (or produced non-finite iterates).

    Attributes:
        stats: the :class:`~implicit_layers.stats.SolverStats` of the failed solve, if any.
    """

    def __init__(self, message: str, stats=None):
        super().__init__(message)
        self.stats = stats


class SingularSystemError(ImplicitLayerError):
    """A linear system (a Jacobian, a KKT matrix, a Lyapunov operator) is singular or nearly so."""


class ConvergenceWarning(UserWarning):
    """Issued instead of :class:`ConvergenceError` when ``on_failure="warn"``."""


@contextmanager
def attributed(name: str, what: str) -> Iterator[None]:
    """Prefix the message of an :class:`ImplicitLayerError` raised inside with ``name: what:``
    (unless it already names ``name``): a solver's error then says which layer's solve failed.
    The exception keeps its type and attributes."""
    try:
        yield
    except ImplicitLayerError as err:
        if err.args and not str(err.args[0]).startswith(f"{name}:"):
            err.args = (f"{name}: {what}: {err.args[0]}", *err.args[1:])
        raise
