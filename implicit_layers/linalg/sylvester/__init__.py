"""Sylvester-type operators ``A X + X B`` and ``A X B − X``: factor once, solve many times.

:mod:`.operator` holds the interface, :mod:`.schur` (CPU, LAPACK) and :mod:`.eig` (any
device) the backends, :mod:`.factor` the choice between them."""

from implicit_layers.linalg.sylvester.factor import BACKENDS, factor_sylvester
from implicit_layers.linalg.sylvester.operator import SylvesterFactorization

__all__ = ["BACKENDS", "factor_sylvester", "SylvesterFactorization"]
