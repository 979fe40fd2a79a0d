"""Deep-equilibrium layers: the layer, its approximate adjoints, and stability tools."""

from implicit_layers.layers.deq.adjoint import JacobianFreeAdjoint, PhantomAdjoint
from implicit_layers.layers.deq.layer import DEQLayer

__all__ = ["DEQLayer", "PhantomAdjoint", "JacobianFreeAdjoint"]
