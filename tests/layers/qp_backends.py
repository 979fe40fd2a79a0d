"""The QP backends every regression test of issue 12 runs on (import ``BACKENDS`` and
parametrize over its keys with ``make``)."""

import implicit_layers as il

BACKENDS = {
    "ip-primal": lambda **kw: il.InteriorPoint(kkt_form="primal", **kw),
    "ip-dual": lambda **kw: il.InteriorPoint(kkt_form="dual", **kw),
    "osqp": lambda **kw: il.OSQP(**kw),
}


def make(name: str, on_failure: str = "raise", infeasible: str = "raise", **solver_options):
    """A :class:`QPLayer` on backend ``name`` (a key of :data:`BACKENDS`)."""
    return il.QPLayer(solver=BACKENDS[name](**solver_options), on_failure=on_failure,
                      infeasible=infeasible)
