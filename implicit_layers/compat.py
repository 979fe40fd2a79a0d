"""The only module that touches private torch internals; each use says why and where checked.

A ground-floor module (beside :mod:`~implicit_layers.errors` and :mod:`~implicit_layers.stats`):
solvers and the core alike ask it whether a tensor is a ``torch.func`` wrapper, and the input
checks (:mod:`~implicit_layers.checks`, also ground floor) skip value checks on wrappers.

Checked against torch 2.3 – 2.13 (CPU build 2.13.0 in CI). If a torch release moves one of
these, only this file needs to change.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, cast

import torch
import torch.autograd.forward_ad as forward_ad
from torch import Tensor, nn


def is_wrapped(t: Tensor) -> bool:
    """Whether ``t`` is a ``torch.func`` wrapper (under ``vmap``/``grad``/``jvp``).

    Why: value checks (``bool(isfinite(t).all())``) are data-dependent control flow, which
    ``vmap`` forbids, and factorizations computed from wrappers must not be cached across
    transform levels. No public API tells a wrapper apart (torch 2.13). While
    ``torch.compile`` traces, the answer is False without the call, which the compiler
    cannot trace (a graph break and a warning per call site)."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._functorch.is_functorch_wrapped_tensor(t)


def any_wrapped(*tensors: Tensor) -> bool:
    return any(is_wrapped(t) for t in tensors)


#: the pullback ``torch.func.vjp`` returns: cotangents of the outputs ↦ those of the primals
VjpFn = Callable[..., tuple[Any, ...]]


def func_vjp(f: Callable[..., Any], *primals: Any) -> tuple[Any, VjpFn]:
    """``torch.func.vjp(f, *primals)``: ``(f(*primals), vjp_fn)``.

    Why: torch annotates ``torch.func.vjp`` as returning a 2- or a 3-tuple (the latter with
    ``has_aux=True``), which a type checker cannot unpack; this says which one (torch 2.13)."""
    return cast(tuple[Any, VjpFn], torch.func.vjp(f, *primals))


def func_vjp_with_aux(f: Callable[..., Any], *primals: Any) -> tuple[Any, VjpFn, Any]:
    """``torch.func.vjp(f, *primals, has_aux=True)``: ``(out, vjp_fn, aux)`` (see :func:`func_vjp`)."""
    return cast(tuple[Any, VjpFn, Any], torch.func.vjp(f, *primals, has_aux=True))


def func_jvp(f: Callable[..., Any], primals: tuple[Any, ...], tangents: tuple[Any, ...]) -> tuple[Any, Any]:
    """``torch.func.jvp(f, primals, tangents)``: ``(f(*primals), J · tangents)``.

    Why: typed like :func:`func_vjp` (torch annotates a 2- or 3-tuple, torch 2.13)."""
    return cast(tuple[Any, Any], torch.func.jvp(f, primals, tangents))


def in_forward_ad() -> bool:
    """Whether a classic ``torch.autograd.forward_ad.dual_level()`` is open.

    Why: ``torch.func.jvp`` refuses to nest inside it ("Nested forward mode AD is not
    supported", torch 2.13), so :func:`implicit_layers.core.jvp.jvp` takes another route there.
    ``forward_ad`` has no public query for the current level."""
    return forward_ad._current_level >= 0


#: One lock for every swap: evaluating a module with other parameters is a critical section.
_SWAP_LOCK = threading.RLock()


def module_parameters(module: nn.Module) -> tuple[Tensor, ...]:
    """``module``'s own parameters, read while no other thread has swapped values in.

    Why: outside the lock another thread's :func:`swapped_parameters` may be between its swap
    and its restore, and ``module.parameters()`` would return that thread's values (a
    four-thread test lost or misrouted whole gradients about once in 40 runs)."""
    with _SWAP_LOCK:
        return tuple(module.parameters())


def parameter_slots(module: nn.Module, params: tuple[Tensor, ...]) -> list[tuple[nn.Module, str, int]]:
    """Every ``(submodule, name)`` that holds one of ``params``, with the parameter's index.

    A module reachable along two paths (a DEQ cell that is both the residual's and the
    fixed-point map's) is listed once, so swapping cannot stack on itself. Read under the
    swap lock, like :func:`module_parameters`."""
    index = {id(p): i for i, p in enumerate(params)}
    with _SWAP_LOCK:
        return [(m, name, index[id(p)]) for m in module.modules()
                for name, p in m._parameters.items() if p is not None and id(p) in index]


@contextmanager
def swapped_parameters(slots, values: tuple[Tensor, ...]) -> Iterator[None]:
    """Evaluate a module with ``values`` in place of its parameters, restoring them after.

    Why: the parameters of a residual that is an ``nn.Module`` are inputs of the autograd
    functions; inside ``torch.func`` transforms and the backward they must be replaced by the
    functions' (possibly wrapped) inputs for the duration of one evaluation. This writes
    ``Module._parameters`` (private, stable since torch 1.0) directly instead of
    ``torch.func.functional_call``, which restores tied names first-in-first-out and leaves a
    plain tensor behind when one submodule is registered twice (torch 2.13). A re-entrant lock
    makes the swap-evaluate-restore atomic across threads, so a layer may be called from
    several threads at once (each evaluation then runs alone)."""
    with _SWAP_LOCK:
        saved = []
        try:
            for m, name, i in slots:
                saved.append((m, name, m._parameters[name]))
                m._parameters[name] = values[i]
            yield
        finally:
            for m, name, p in reversed(saved):
                m._parameters[name] = p


def compiler_disable(fn):
    """Keep ``torch.compile`` out of ``fn``: the solve runs eagerly (a graph break).

    Why: tracing a solver loop specializes its data-dependent branches and lets the compiler
    change its arithmetic, i.e. run a different algorithm than eager; an implicit layer's
    solve must stay opaque to the compiler. ``torch.compiler.disable`` is public since 2.1."""
    return torch.compiler.disable(fn, recursive=True)


@contextmanager
def mutation_explained(name: str) -> Iterator[None]:
    """Turn torch.func's refusal of a residual that writes a captured tensor in place into a
    ``ValueError`` that names the likely cause.

    Why: derivatives of residuals are taken with ``torch.func`` transforms, which raise a
    ``RuntimeError`` ("attempted to call in-place operation ... that would mutate a captured
    Tensor", torch 2.13) when the residual updates state, e.g. BatchNorm's running statistics
    in training mode. The message is the only way to tell that error apart."""
    try:
        yield
    except RuntimeError as err:
        if "in-place operation" not in str(err) or "captured Tensor" not in str(err):
            raise
        raise ValueError(
            f"{name}: the residual updates a tensor in place (e.g. BatchNorm's running "
            f"statistics in training mode), which its derivatives cannot follow; put such "
            f"modules in eval mode or use BatchNorm(track_running_stats=False)") from err
