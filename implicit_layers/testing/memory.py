"""Memory a backward pass keeps alive, measured on any device (used by tests and benchmarks)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any  # autograd graph nodes: torch types them loosely

import torch


def saved_tensor_bytes(fn: Callable[[], object]) -> int:
    """Bytes of the tensors that the autograd graph of ``fn()``'s output keeps for backward.

    ``fn`` must return the output tensor (or a tuple of them). The graph is walked node by
    node and every saved tensor counted once per storage; this is the memory a backward pass
    keeps alive (what implicit differentiation saves over unrolling), measurable on CPU too.
    (Saved-tensor hooks cannot be used: torch.func refuses to run under them.)
    """
    out = fn()
    outs = out if isinstance(out, (tuple, list)) else (out,)
    storages: dict[int, int] = {}
    seen: set[int] = set()
    stack: list[Any] = [t.grad_fn for t in outs if isinstance(t, torch.Tensor) and t.grad_fn is not None]

    def count(t: object) -> None:
        if isinstance(t, torch.Tensor) and t.layout == torch.strided:
            st = t.untyped_storage()
            storages[st.data_ptr()] = st.nbytes()
        elif isinstance(t, (tuple, list)):
            for item in t:
                count(item)

    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        for attr in dir(node):
            if attr.startswith("_saved_"):
                count(getattr(node, attr, None))
        try:
            count(node.saved_tensors)  # custom autograd.Function nodes
        except (AttributeError, RuntimeError):
            pass
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return sum(storages.values())
