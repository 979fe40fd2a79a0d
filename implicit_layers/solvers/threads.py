"""Thread control for the tiny dense factorizations inside iterative solvers."""

from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def single_threaded(device: torch.device):
    """Run tiny CPU LAPACK calls on one thread (restoring the thread count afterwards): MKL's
    threaded LAPACK spent ~20 ms per tiny batched call (a 2 × 2 Cholesky, an Anderson
    least-squares system) when the other core of a 2-core machine was busy, 1000× the work.

    >>> import torch
    >>> with single_threaded(torch.device("cpu")):
    ...     torch.get_num_threads()
    1
    """
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
