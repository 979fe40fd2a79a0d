"""The public entries that tests/test_fuzz.py fuzzes: for each, a generator of a well-posed
problem (random sizes, batch, dtype, solver), the call, and a check of a returned answer.

An entry is ``make(seed, B, n, dtype, variant) -> Case``. ``Case.inputs`` are the tensors the
fuzzer may corrupt (by name; ``None`` marks an optional argument left out), ``Case.call``
takes them as keyword arguments and returns a tuple of outputs, ``Case.check(inputs, outputs)``
asserts that an answer solves its problem. User callbacks raise :class:`CallbackError` on any
failure of their own (a shape the fuzzer made incompatible): such errors are the caller's and
propagate unchanged through the library.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache

import torch
from torch import Tensor

import implicit_layers as il
from implicit_layers import functional as F
from implicit_layers.solvers.qp.active_set import optimality_residual
from implicit_layers.solvers.qp.problem import QPProblem


class CallbackError(Exception):
    """An error raised inside a user callback (residual, cell, objective)."""


def callback(fn: Callable) -> Callable:
    def wrapped(*args):
        try:
            return fn(*args)
        except Exception as err:
            raise CallbackError(f"{type(err).__name__}: {err}") from err
    return wrapped


@dataclass
class Case:
    inputs: dict[str, Tensor | None]
    call: Callable[..., tuple[Tensor, ...]]
    check: Callable[[dict, tuple[Tensor, ...]], None]
    #: inputs that may hold an infinity of this sign (a bound that is absent)
    infinite_ok: dict[str, float] = field(default_factory=dict)

    def valid(self, name: str, value) -> bool:
        """Whether the call must accept this input (a float tensor with allowed values)."""
        if value is None:
            return True
        if not isinstance(value, Tensor) or value.dtype not in (torch.float32, torch.float64):
            return False
        finite = torch.isfinite(value)
        sign = self.infinite_ok.get(name)
        if sign is not None:
            finite = finite | (value == sign * torch.inf)
        return bool(finite.all())


def _tols(dtype):
    eps = torch.finfo(dtype).eps
    return eps ** 0.75, 1e-7 if dtype == torch.float64 else 1e-3


def _norm(t: Tensor, event_ndim: int) -> Tensor:
    t = t.double()
    return t.abs() if event_ndim == 0 else t.flatten(t.ndim - event_ndim).norm(dim=-1)


def _close_to_zero(r: Tensor, scale: Tensor, rel: float, what: str):
    r, scale = r.double(), scale.double()
    assert bool((r <= rel * scale + 1e-300).all()), (
        f"{what}: residual {r.max():.3e} vs scale {scale.max():.3e}")


def _meets(r: Tensor, bound: Tensor, terms: Tensor, dtype, what: str):
    """``r ≤ bound`` (a solver's documented stopping test), up to a factor for the evaluation
    of ``r`` here and the round-off of its terms."""
    eps = torch.finfo(dtype).eps
    _close_to_zero(r, 4 * bound.double() + 64 * eps * terms.double(), 1.0, what)


class _Rand:
    def __init__(self, seed: int, dtype):
        self.g, self.dtype = torch.Generator().manual_seed(seed), dtype

    def randn(self, *shape):
        return torch.randn(*shape, generator=self.g, dtype=torch.float64).to(self.dtype)

    def rand(self, *shape):
        return torch.rand(*shape, generator=self.g, dtype=torch.float64).to(self.dtype)

    def spd(self, B, n):
        L = self.randn(B, n, n).double()
        return (L @ L.mT / max(n, 1) + torch.eye(n, dtype=torch.float64)).to(self.dtype)

    def stable(self, B, n, radius):
        M = self.randn(B, n, n).double()
        if n:
            M = radius * M / torch.linalg.matrix_norm(M, 2).clamp_min(1e-12)[..., None, None]
        return M.to(self.dtype)


ROOT_SOLVERS = {"Newton": il.Newton, "Broyden": il.Broyden, "ScipyRoot": il.ScipyRoot}


def root_find(seed, B, n, dtype, variant):
    r = _Rand(seed, dtype)
    solver, event_ndim = ("Newton", "Broyden", "ScipyRoot")[variant % 3], variant // 3 % 2
    inputs = {"x": 2 * r.randn(B, n), "a": 0.5 + r.rand(B, n), "y0": r.randn(B, n)}
    residual = callback(lambda xa, y: y ** 3 + xa[1] * y - xa[0])

    def call(x, a, y0):
        return (F.root_find(residual, (x, a), y0, solver=ROOT_SOLVERS[solver](),
                            event_ndim=event_ndim),)

    def check(inp, out):
        (y,) = out
        tol, _ = _tols(y.dtype)
        f = y ** 3 + inp["a"] * y - inp["x"]
        terms = _norm(y.abs() ** 3 + inp["a"] * y.abs() + inp["x"].abs(), event_ndim)
        _meets(_norm(f, event_ndim), tol + tol * _norm(y, event_ndim), terms, y.dtype, "root_find")
    return Case(inputs, call, check)


def fixed_point(seed, B, n, dtype, variant):
    r = _Rand(seed, dtype)
    solver = (il.Anderson, il.Picard)[variant % 2]
    inputs = {"x": r.randn(B, n), "z0": r.randn(B, n)}
    cell = callback(lambda x, z: 0.5 * torch.tanh(z) + x)

    def call(x, z0):
        return (F.fixed_point(cell, x, z0, solver=solver()),)

    def check(inp, out):
        (z,) = out
        tol, _ = _tols(z.dtype)
        f = 0.5 * torch.tanh(z) + inp["x"] - z
        _meets(_norm(f, 1), tol + tol * _norm(z, 1), _norm(z.abs() + inp["x"].abs(), 1), z.dtype,
               "fixed_point")
    return Case(inputs, call, check)


class _Cell(torch.nn.Module):
    def __init__(self, n, dtype, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W = torch.nn.Parameter(
            (0.4 * torch.randn(n, n, generator=g, dtype=torch.float64) / max(n, 1) ** 0.5).to(dtype))

    def forward(self, x, z):
        if not isinstance(z, Tensor) or z.shape[-1] != self.W.shape[0] or z.dtype != self.W.dtype:
            raise CallbackError("the cell's weight does not fit z")
        return callback(lambda x, z: torch.tanh(z @ self.W.T + x))(x, z)


def deq_layer(seed, B, n, dtype, variant):
    r = _Rand(seed, dtype)
    layer = il.DEQLayer(_Cell(n, dtype, seed))
    inputs = {"x": r.randn(B, n)}

    def call(x):
        return (layer(x),)

    def check(inp, out):
        (z,) = out
        if not z.numel():  # nothing was evaluated (the cell may not even fit the input)
            return
        tol, _ = _tols(z.dtype)
        f = layer.cell(inp["x"], z) - z
        _meets(_norm(f, 1), tol + tol * _norm(z, 1), _norm(z.abs() + inp["x"].abs(), 1), z.dtype,
               "DEQLayer")
    return Case(inputs, call, check)


def argmin(seed, B, n, dtype, variant):
    r = _Rand(seed, dtype)
    solver = (il.LBFGS, il.NewtonCG)[variant % 2]
    inputs = {"x": r.randn(B, n), "a": 0.1 + r.rand(B, n), "y0": torch.zeros(B, n, dtype=dtype)}
    objective = callback(lambda xa, y: ((y - xa[0]) ** 2 + xa[1] * y ** 4).sum(-1))

    def call(x, a, y0):
        return (F.argmin(objective, (x, a), y0, solver=solver()),)

    def check(inp, out):
        (y,) = out
        if not _same_shapes(y, inp["x"], inp["a"]):  # broadcast data: a different objective
            return
        tol, _ = _tols(y.dtype)
        grad = 2 * (y - inp["x"]) + 4 * inp["a"] * y ** 3
        terms = 2 * inp["x"].abs() + 2 * y.abs() + 4 * inp["a"] * y.abs() ** 3
        # ‖∇f(y)‖ ≤ tol + rtol ‖∇f(y0)‖ with y0 = 0, ∇f(0) = −2x
        _meets(_norm(grad, 1), tol + tol * _norm(2 * inp["x"], 1), _norm(terms, 1), y.dtype,
               "argmin")
    return Case(inputs, call, check)


def least_squares(seed, B, n, dtype, variant):
    r = _Rand(seed, dtype)
    solver = (il.LevenbergMarquardt, il.GaussNewton)[variant % 2]
    inputs = {"x": r.randn(B, n), "a": 0.1 + 0.3 * r.rand(B, n), "y0": torch.zeros(B, n, dtype=dtype)}
    residual = callback(lambda xa, y: torch.cat([y - xa[0], xa[1] * y ** 2], -1))

    def call(x, a, y0):
        return (F.least_squares(residual, (x, a), y0, solver=solver()),)

    def check(inp, out):
        (y,) = out
        if not _same_shapes(y, inp["x"], inp["a"]):  # broadcast data: a different residual
            return
        a, tol = inp["a"], _tols(y.dtype)[0]
        grad = (y - inp["x"]) + 2 * a * y * (a * y ** 2)  # Jᵀr; Jᵀr(y0 = 0) = −x
        terms = y.abs() + inp["x"].abs() + 2 * a ** 2 * y.abs() ** 3
        _meets(_norm(grad, 1), tol + tol * _norm(inp["x"], 1), _norm(terms, 1), y.dtype,
               "least_squares")
    return Case(inputs, call, check)


def _same_shapes(y: Tensor, *data: Tensor) -> bool:
    return all(t.shape == y.shape for t in data)


def _kkt_check(Q, c, A, b, x, lam, rel, what):
    """``K (x; λ) = (−c; b)`` to ``rel`` relative to ``|K||z| + |(c; b)|`` over the whole
    system (normwise, what a backward-stable solve guarantees)."""
    Qs = 0.5 * (Q + Q.mT)
    stat = (Qs @ x.unsqueeze(-1) + c.unsqueeze(-1) + A.mT @ lam.unsqueeze(-1)).squeeze(-1)
    prim = (A @ x.unsqueeze(-1)).squeeze(-1) - b
    scale = torch.cat([(Qs.abs() @ x.abs().unsqueeze(-1) + c.abs().unsqueeze(-1)
                        + A.abs().mT @ lam.abs().unsqueeze(-1)).squeeze(-1),
                       (A.abs() @ x.abs().unsqueeze(-1)).squeeze(-1) + b.abs()], -1)
    _close_to_zero(torch.cat([stat, prim], -1).abs(), _amax(scale), rel, what)


def eq_qp(seed, B, n, dtype, variant):
    r = _Rand(seed, dtype)
    m = min(n, 2) if n else 1
    inputs = {"Q": r.spd(B, n), "c": r.randn(B, n), "A": r.randn(B, m, n), "b": r.randn(B, m)}

    def call(Q, c, A, b):
        return F.eq_qp(Q, c, A, b)

    def check(inp, out):
        _kkt_check(*(inp[k].double() for k in "QcAb"), *(o.double() for o in out),
                   _tols(out[0].dtype)[1], "eq_qp")
    return Case(inputs, call, check)


def _qp_tol(dtype) -> float:
    """The QP solvers' default optimality tolerance."""
    return 1e-9 if dtype == torch.float64 else 1e-5


def _flat_qp(Q, c, A, b, G, lower, upper) -> QPProblem:
    """The (flattened, float64) QPProblem of the data, bounds normalized as the layer does."""
    data = [t.double() for t in (Q, c, A, b, G, lower, upper)]
    events = (2, 1, 2, 1, 2, 1, 1)
    batch = torch.broadcast_shapes(*(t.shape[:t.ndim - e] for t, e in zip(data, events)))
    B = batch.numel()
    flat = [t.expand(*batch, *t.shape[t.ndim - e:]).reshape(B, *t.shape[t.ndim - e:])
            for t, e in zip(data, events)]
    flat[0] = 0.5 * (flat[0] + flat[0].mT)
    return QPProblem.from_data(*flat)


def _qp_check(inp, out, lower=None):
    """The solvers' documented test: the optimality residual of
    :func:`~implicit_layers.solvers.qp.active_set.optimality_residual` within its tolerance
    (relative to ``1 + ‖data‖``: an absolute floor for tiny data)."""
    Q, c = inp["Q"], inp["c"]
    n, batch = c.shape[-1], c.shape[:-1]
    A = inp.get("A") if inp.get("A") is not None else c.new_zeros(*batch, 0, n)
    b = inp.get("b") if inp.get("b") is not None else c.new_zeros(*batch, 0)
    G, h = inp["G"], inp["h"]
    lo = lower if lower is not None else torch.full_like(h, -torch.inf)
    P = _flat_qp(Q, c, A, b, G, lo, h)
    x, lam, mu = (o.double().reshape(P.batch, o.shape[-1]) for o in out)
    res = optimality_residual(P, x, lam, mu)
    tol = _qp_tol(out[0].dtype)
    assert bool((res <= 10 * tol).all()), f"qp: optimality residual {res.max():.3e} > {tol:.0e}"


def _feasible(A, b, G, h, x):
    """``x`` (a mean of feasible points) satisfies the constraints to the QP test's tolerance."""
    tol = _qp_tol(x.dtype)
    A, b, G, h, x = (t.double() for t in (A, b, G, h, x))
    Ax, Gx = (A @ x.unsqueeze(-1)).squeeze(-1), (G @ x.unsqueeze(-1)).squeeze(-1)
    eq = (Ax - b).abs() / (1 + torch.maximum(Ax.abs(), b.abs()))
    ineq = (Gx - h).clamp_min(0) / (1 + torch.maximum(Gx.abs(), h.abs()))
    assert bool((eq <= 10 * tol).all()) and bool((ineq <= 10 * tol).all()), "infeasible answer"


def qp(seed, B, n, dtype, variant):
    r = _Rand(seed, dtype)
    solver = (il.InteriorPoint, il.OSQP)[variant % 2]
    with_eq = variant // 2 % 2 == 1 and n > 1
    inputs = {"Q": r.spd(B, n), "c": r.randn(B, n),
              "A": r.randn(B, 1, n) if with_eq else None, "b": r.randn(B, 1) if with_eq else None,
              "G": r.randn(B, 3, n), "h": 0.5 + r.rand(B, 3)}

    def call(Q, c, A, b, G, h):
        return F.qp(Q, c, A, b, G, h, solver=solver())
    return Case(inputs, call, _qp_check, {"h": 1.0})


def qp_layer_two_sided(seed, B, n, dtype, variant):
    r = _Rand(seed, dtype)
    layer = il.QPLayer()
    inputs = {"Q": r.spd(B, n), "c": r.randn(B, n), "G": r.randn(B, 2, n),
              "h": 0.5 + r.rand(B, 2), "lower": -0.5 - r.rand(B, 2)}

    def call(Q, c, G, h, lower):
        return layer(Q, c, None, None, G, h, lower)

    def check(inp, out):
        _qp_check(inp, out, lower=inp["lower"])
    return Case(inputs, call, check, {"h": 1.0, "lower": -1.0})


def _amax(t: Tensor, dim: int = -1) -> Tensor:
    """``t.amax(dim, keepdim=True)``, 0 over an empty dim."""
    return t.amax(dim, keepdim=True) if t.shape[dim] else t.sum(dim, keepdim=True)


def _sylvester_check(residual, scale, rel, what):
    _close_to_zero(residual.abs(), _amax(scale.flatten(-2)).unsqueeze(-1), rel, what)


def lyapunov(seed, B, n, dtype, variant):
    r = _Rand(seed, dtype)
    backend = ("auto", "schur", "eig")[variant % 3]
    eye = torch.eye(n, dtype=dtype)
    inputs = {"A": r.stable(B, n, 0.5) - eye, "Q": r.spd(B, n)}

    def call(A, Q):
        return (F.lyapunov(A, Q, backend=backend),)

    def check(inp, out):
        A, Q, (P,) = inp["A"].double(), inp["Q"].double(), (out[0].double(),)
        scale = 2 * A.abs() @ P.abs() + Q.abs()
        _sylvester_check(A @ P + P @ A.mT + Q, scale, _tols(out[0].dtype)[1], "lyapunov")
    return Case(inputs, call, check)


def discrete_lyapunov(seed, B, n, dtype, variant):
    r = _Rand(seed, dtype)
    backend = ("auto", "schur", "eig")[variant % 3]
    inputs = {"A": r.stable(B, n, 0.7), "Q": r.spd(B, n)}

    def call(A, Q):
        return (F.discrete_lyapunov(A, Q, backend=backend),)

    def check(inp, out):
        A, Q, P = inp["A"].double(), inp["Q"].double(), out[0].double()
        scale = A.abs() @ P.abs() @ A.abs().mT + P.abs() + Q.abs()
        _sylvester_check(A @ P @ A.mT - P + Q, scale, _tols(out[0].dtype)[1], "discrete_lyapunov")
    return Case(inputs, call, check)


def sylvester(seed, B, n, dtype, variant):
    r = _Rand(seed, dtype)
    backend = ("auto", "schur", "eig")[variant % 3]
    m = variant // 3 % 3
    inputs = {"A": r.stable(B, n, 0.5) + torch.eye(n, dtype=dtype),
              "B": r.stable(B, m, 0.5) + torch.eye(m, dtype=dtype), "C": r.randn(B, n, m)}

    def call(A, B, C):
        return (F.sylvester(A, B, C, backend=backend),)

    def check(inp, out):
        A, B_, C, X = inp["A"].double(), inp["B"].double(), inp["C"].double(), out[0].double()
        scale = A.abs() @ X.abs() + X.abs() @ B_.abs() + C.abs()
        _sylvester_check(A @ X + X @ B_ - C, scale, _tols(out[0].dtype)[1], "sylvester")
    return Case(inputs, call, check)


def _simplex(n, dtype, B):
    return (torch.ones(B, 1, n, dtype=dtype), torch.ones(B, 1, dtype=dtype),
            -torch.eye(n, dtype=dtype).expand(B, n, n).clone(), torch.zeros(B, n, dtype=dtype))


def smoothed_lp(seed, B, n, dtype, variant):
    r = _Rand(seed, dtype)
    A, b, G, h = _simplex(n, dtype, B)
    inputs = {"c": r.randn(B, n), "A": A, "b": b, "G": G, "h": h}

    def call(c, A, b, G, h):
        return (F.smoothed_lp(c, A, b, G, h, gamma=0.5),)

    def check(inp, out):
        (x,) = out
        _feasible(inp["A"], inp["b"], inp["G"], inp["h"], x)
    return Case(inputs, call, check, {"h": 1.0})


def perturbed_lp(seed, B, n, dtype, variant):
    r = _Rand(seed, dtype)
    A, b, G, h = _simplex(n, dtype, B)
    inputs = {"c": r.randn(B, n), "A": A, "b": b, "G": G, "h": h}

    def call(c, A, b, G, h):
        return (F.perturbed_lp(c, A, b, G, h, sigma=0.5, samples=4),)
    return Case(inputs, call, smoothed_lp(seed, B, n, dtype, variant).check, {"h": 1.0})


@cache
def _cvxpy_layer(n: int):
    import cvxpy as cp

    x, p, w = cp.Variable(n), cp.Parameter(n, name="p"), cp.Parameter(name="w", nonneg=True)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(x - p) + w * cp.sum(x)), [x >= 0, x <= 1])
    return il.QPLayer.from_cvxpy(problem, parameters=[p, w], variables=[x])


def from_cvxpy(seed, B, n, dtype, variant):
    r = _Rand(seed, dtype)
    size = max(n, 1)  # a cvxpy variable has at least one entry
    layer = _cvxpy_layer(size)
    inputs = {"p": 2 * r.randn(B, size), "w": r.rand(B)}

    def call(p, w):
        return layer(p, w)

    def check(inp, out):
        (x,) = out
        p, w = inp["p"].double(), inp["w"].double().unsqueeze(-1)
        expected = (p - w / 2).clamp(0, 1)
        # the QP's optimality test (tol 1e-9, float32 1e-5) is relative to 1 + the data's size
        # (here |c| = |2p − w|): x is within that over Q = 2, and within √tol at a degenerate
        # vertex (p − w/2 ≈ 0 or 1)
        tol = _qp_tol(x.dtype)
        allowed = 10 * tol * (1 + (2 * p - w).abs()) + 10 * tol ** 0.5
        _close_to_zero((x.double() - expected).abs(), allowed, 1.0, "from_cvxpy")
    return Case(inputs, call, check)


ENTRIES = {f.__name__: f for f in (
    root_find, fixed_point, deq_layer, argmin, least_squares, eq_qp, qp, qp_layer_two_sided,
    lyapunov, discrete_lyapunov, sylvester, smoothed_lp, perturbed_lp, from_cvxpy)}
