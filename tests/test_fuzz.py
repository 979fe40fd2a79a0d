"""Property-based fuzzing of every public entry (issue 13, observation 9).

Each example draws a well-posed problem (:mod:`tests.fuzz_entries`: batch B ∈ {0, 1, 3},
size n ∈ {0, 1, 3}, float32 or float64, a solver or backend) and corrupts it with at most one
mutation: a wrong dtype (half, integer, bool, complex, mixed), NaN/±Inf entries, one input or
all scaled by up to 10^±300, a non-contiguous view, a wrong or non-broadcasting shape, a
non-tensor. The contract: the call returns an answer that solves its problem (checked, with
finite values, and a finite gradient when one is taken), or raises ``ValueError`` or an
``ImplicitLayerError``; never another exception type, a hang (deadline) or a silent NaN.
Errors raised inside the fuzzer's own callbacks (a shape it made incompatible with the user
function) are the caller's and must propagate unchanged.

Outcome classes are recorded as hypothesis events (``pytest --hypothesis-show-statistics``).
"""

from __future__ import annotations

import math
from datetime import timedelta

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import implicit_layers as il
from tests.fuzz_entries import ENTRIES, CallbackError
from tests.layers.qp_fixtures import one_thread  # noqa: F401 (autouse fixture)

EXAMPLES = 200  # per entry
ACCEPTED = (ValueError, il.ImplicitLayerError, CallbackError)




def _mutate(inputs: dict, mutation) -> dict:
    out = dict(inputs)
    names = [k for k, v in inputs.items() if isinstance(v, torch.Tensor)]
    kind, *args = mutation
    if kind == "none" or not names:
        return out
    if kind == "scale_all":
        return {k: v * 10.0 ** args[0] if isinstance(v, torch.Tensor) else v
                for k, v in inputs.items()}
    name = names[args[0] % len(names)]
    t = out[name]
    if kind == "scale_one":
        out[name] = t * 10.0 ** args[1]
    elif kind == "nonfinite" and t.numel():
        t = t.clone()
        t.view(-1)[0] = args[1]
        out[name] = t
    elif kind == "dtype":
        out[name] = t.to(args[1])
    elif kind == "mixed_precision":
        out[name] = t.to(torch.float32 if t.dtype == torch.float64 else torch.float64)
    elif kind == "view":  # same values, every other element of a wider buffer
        out[name] = torch.stack([t, t], -1)[..., 0]
    elif kind == "shape":
        out[name] = _reshape(t, args[1])
    elif kind == "not_tensor":
        out[name] = args[1]
    return out


MUTATIONS = st.one_of(
    st.just(("none",)),
    st.tuples(st.just("scale_all"), st.sampled_from([-300, -150, -30, -8, 8, 30, 150, 300])),
    st.tuples(st.just("scale_one"), st.integers(0, 7), st.sampled_from([-300, -30, 30, 300])),
    st.tuples(st.just("nonfinite"), st.integers(0, 7), st.sampled_from([math.nan, math.inf, -math.inf])),
    st.tuples(st.just("dtype"), st.integers(0, 7), st.sampled_from(
        [torch.float16, torch.bfloat16, torch.int64, torch.bool, torch.complex128])),
    st.tuples(st.just("mixed_precision"), st.integers(0, 7)),
    st.tuples(st.just("view"), st.integers(0, 7)),
    st.tuples(st.just("shape"), st.integers(0, 7), st.sampled_from(
        ["drop_last", "grow_last", "extra_batch", "squeeze_all", "empty_last"])),
    st.tuples(st.just("not_tensor"), st.integers(0, 7), st.sampled_from([None, 1.5, "x", [1.0]])),
)


def _reshape(t: torch.Tensor, how: str) -> torch.Tensor:
    if how == "drop_last":
        return (t.select(-1, 0) if t.shape[-1] else t.sum(-1)) if t.ndim else t.reshape(1)
    if how == "grow_last":
        return torch.cat([t, t[..., :1]], -1) if t.ndim else t.reshape(1, 1)
    if how == "extra_batch":
        return t.unsqueeze(0).expand(5, *t.shape).clone()
    if how == "squeeze_all":
        return t.reshape(-1)[:1].reshape(()) if t.numel() else t.reshape(-1)
    return t[..., :0] if t.ndim else t.reshape(0)


def _classify(err: BaseException) -> str:
    assert isinstance(err, ACCEPTED), f"undocumented exception {type(err).__name__}: {err}"
    return type(err).__name__


def _check_outputs(case, inputs, outputs) -> None:
    for o in outputs:
        assert isinstance(o, torch.Tensor) and bool(torch.isfinite(o).all()), "a silent NaN/Inf"
    if any(o.numel() for o in outputs):  # an empty unknown is returned without evaluating f
        case.check(inputs, outputs)


def _floats(inputs):
    return [v for v in inputs.values() if isinstance(v, torch.Tensor) and v.is_floating_point()
            and v.dtype in (torch.float32, torch.float64)]


def _run(name, seed, B, n, double, variant, mutation, backward):
    dtype = torch.float64 if double else torch.float32
    case = ENTRIES[name](seed, B, n, dtype, variant)
    inputs = _mutate(case.inputs, mutation)
    if backward:
        floats = {id(v) for v in _floats(inputs)}
        inputs = {k: v.detach().requires_grad_() if id(v) in floats else v
                  for k, v in inputs.items()}
    event(f"mutation: {mutation[0]}")
    try:
        outputs = case.call(**inputs)
    except BaseException as err:  # noqa: BLE001 (classified: documented types only)
        event(f"outcome: {_classify(err)}")
        return
    valid = all(case.valid(k, v) for k, v in inputs.items())
    assert valid, f"accepted malformed input (mutation {mutation})"
    _check_outputs(case, {k: v.detach() if isinstance(v, torch.Tensor) else v
                          for k, v in inputs.items()}, outputs)
    event("outcome: solved")
    wrt = [v for v in _floats(inputs) if v.requires_grad]
    loss = sum(o.double().square().sum() for o in outputs)
    if not backward or not wrt or not loss.requires_grad:
        return
    try:
        grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    except BaseException as err:  # noqa: BLE001
        assert isinstance(err, il.ImplicitLayerError), f"backward raised {type(err).__name__}: {err}"
        event(f"backward: {type(err).__name__}")
        return
    for g in grads:
        assert g is None or bool(torch.isfinite(g).all()), "a silent NaN/Inf gradient"
    event("backward: finite")


@pytest.mark.parametrize("name", sorted(ENTRIES))
@settings(max_examples=EXAMPLES, deadline=timedelta(seconds=30), derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(seed=st.integers(0, 2 ** 16), B=st.sampled_from([0, 1, 3]), n=st.sampled_from([0, 1, 3]),
       double=st.booleans(), variant=st.integers(0, 11), mutation=MUTATIONS,
       backward=st.booleans())
def test_fuzz(name, seed, B, n, double, variant, mutation, backward):
    _run(name, seed, B, n, double, variant, mutation, backward)
