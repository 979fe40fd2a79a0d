"""A cvxpy front door for :class:`~implicit_layers.QPLayer`.

``QPLayer.from_cvxpy(problem, parameters=[...], variables=[...])`` compiles a parametrized
cvxpy problem once and returns a module that maps parameter tensors to the values of the
chosen variables, differentiably. cvxpy canonicalizes the problem (DPP) into

    min_x ½ xᵀP(θ)x + q(θ)ᵀx   s.t.  A_z(θ) x + b_z(θ) = 0,   A_+(θ) x + b_+(θ) ≥ 0

where every coefficient is affine in the stacked parameter vector ``θ``. The affine maps are
read off once (one probe per entry of ``θ`` plus the offset) and stored densely, so a call
is a few tensor contractions followed by the QP layer with

    Q = P,  c = q,  A = A_z,  b = −b_z,  G = −A_+,  h = b_+.

Two canonical inequality rows that are the same row with opposite signs for every ``θ``
(``a(θ)ᵀx ≤ h₁(θ)`` and ``−a(θ)ᵀx ≤ h₂(θ)``: a bound on both sides of ``x`` or of ``G(θ)x``,
``lo ≤ x, x ≤ hi``) become one two-sided row ``−h₂ ≤ aᵀx ≤ h₁`` of the QP layer, which
the interior point solves at the cost of one row instead of two. A call whose parameters
cross such bounds (``−h₂ > h₁``: infeasible, which the layer would reject as malformed
two-sided input) solves the two rows apart instead, as cvxpy does.

Problems that are not DPP QPs (second-order cones, exponentials, non-affine parameter use)
are rejected with a ``ValueError`` saying so.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from implicit_layers.checks import all_finite, check_same_dtype_device, check_tensor
from implicit_layers.compat import is_wrapped


def _fortran_flat(t: Tensor, event_ndim: int) -> Tensor:
    """Flatten the last ``event_ndim`` dims in column-major order (cvxpy's layout)."""
    lead = t.ndim - event_ndim
    perm = (*range(lead), *reversed(range(lead, t.ndim)))
    return t.permute(perm).reshape(*t.shape[:lead], t.shape[lead:].numel())  # B = 0 too


def opposite_pairs(rows: np.ndarray) -> tuple[list[int], list[int]]:
    """``(upper, lower)``: row indices such that ``rows[lower[k]] == −rows[upper[k]]`` exactly
    (each row in one pair at most, zero rows in none), in the order the pairs close."""
    pending: dict[bytes, list[int]] = {}
    upper, lower = [], []
    for i, row in enumerate(rows):
        if not row.any():
            continue
        partners = pending.get((-row + 0.0).tobytes())  # + 0.0: −0.0 and 0.0 alike
        if partners:
            upper.append(partners.pop())
            lower.append(i)
        else:
            pending.setdefault((row + 0.0).tobytes(), []).append(i)
    return upper, lower


def _fortran_unflat(t: Tensor, shape: tuple[int, ...]) -> Tensor:
    lead = t.shape[:-1]
    u = t.reshape(*lead, *reversed(shape))
    k = len(shape)
    return u.permute(*range(len(lead)), *reversed(range(len(lead), len(lead) + k)))


class CvxpyQPLayer(nn.Module):
    """A :class:`~implicit_layers.QPLayer` built from a parametrized cvxpy QP.

    Args:
        problem: a ``cvxpy.Problem`` that is DPP and a QP (``problem.is_qp()``).
        parameters: every ``cvxpy.Parameter`` of the problem, in the order the tensors will
            be passed to ``forward``.
        variables: the ``cvxpy.Variable`` s whose values ``forward`` returns.
        layer: the QP layer that solves the canonical problem (its solver and failure policy).
        two_sided: merge opposite canonical inequality rows into two-sided rows (default
            True; see the module docstring). ``False`` keeps cvxpy's one-sided rows.

    ``forward(*params)`` takes one tensor per parameter, shaped ``(*batch, *param.shape)``
    (leading dims broadcast, finite values: a bound of magnitude ``≥ 1e20`` means none), and
    returns a tuple with one tensor per variable.

    >>> import cvxpy as cp, torch, implicit_layers as il
    >>> x = cp.Variable(2); p = cp.Parameter(2)
    >>> prob = cp.Problem(cp.Minimize(cp.sum_squares(x - p)), [x >= 0])
    >>> layer = il.QPLayer.from_cvxpy(prob, parameters=[p], variables=[x])
    >>> layer(torch.tensor([1.0, -1.0], dtype=torch.float64))[0].round(decimals=6) + 0.0  # no -0.
    tensor([1., 0.], dtype=torch.float64)
    """

    # buffers: the canonical data as affine maps of θ = (parameters, 1), set in __init__
    P_map: Tensor
    q_map: Tensor
    A_map: Tensor
    b_map: Tensor
    G_map: Tensor
    h_map: Tensor
    lower_map: Tensor

    def __init__(self, problem, parameters, variables, layer: nn.Module, two_sided: bool = True):
        super().__init__()
        import cvxpy as cp

        if not problem.is_dpp():
            raise ValueError("from_cvxpy: the problem is not DPP (parameters must enter affinely)")
        if not problem.is_qp():
            raise ValueError("from_cvxpy: the problem is not a QP (quadratic/affine objective, "
                             "affine equality and inequality constraints); use cvxpylayers "
                             "for general conic problems")
        params, variables = list(parameters), list(variables)
        if {p.id for p in params} != {p.id for p in problem.parameters()}:
            raise ValueError("from_cvxpy: parameters must list every parameter of the problem once")
        known = {v.id for v in problem.variables()}
        if not variables or any(v.id not in known for v in variables):
            raise ValueError("from_cvxpy: variables must be variables of the problem")
        data, _, _ = problem.get_problem_data(solver=cp.OSQP)
        prog = data["param_prob"]
        dims = prog.cone_dims
        if any(len(d) if isinstance(d, list) else d for d in (dims.soc, dims.psd, dims.exp)):
            raise ValueError("from_cvxpy: the canonical problem has conic constraints: not a QP")
        self.layer, self.params, self.variables = layer, params, variables
        self.cols = [prog.param_id_to_col[p.id] for p in params]
        self.var_cols = [prog.var_id_to_col[v.id] for v in variables]
        P, q, A, b = self._affine_maps(prog)
        e, k = dims.zero, dims.zero + dims.nonneg
        # G = −A_+, h = b_+; merged rows first (upper side from one row, lower from its partner)
        upper, lower = opposite_pairs(A[:, e:k].transpose(1, 0, 2).reshape(k - e, -1)) \
            if two_sided else ([], [])
        single = sorted(set(range(k - e)) - set(upper) - set(lower))
        rows = np.asarray(upper + single, dtype=np.int64) + e
        self.n_pairs = len(upper)
        partners = np.asarray(lower, dtype=np.int64) + e
        maps = {"P_map": P, "q_map": q, "A_map": A[:, :e], "b_map": -b[:, :e],
                "G_map": -A[:, rows], "h_map": b[:, rows], "lower_map": -b[:, partners]}
        for name, t in maps.items():
            self.register_buffer(name, torch.as_tensor(t, dtype=torch.float64))

    @staticmethod
    def _affine_maps(prog):
        """Coefficient maps ``(T+1, ...)``: the data at ``θ = e_j`` (the last column is the offset)."""
        T, n = prog.total_param_size, prog.x.size
        prog.reduced_A.cache(False)
        prog.reduced_P.cache(False)
        P, q, A, b = [], [], [], []
        q_all = prog.q.toarray()
        for j in range(T + 1):
            e = np.zeros(T + 1)
            e[j] = 1.0
            P.append(prog.reduced_P.get_matrix_from_tensor(e, with_offset=False)[0].toarray())
            Aj, bj = prog.reduced_A.get_matrix_from_tensor(e, with_offset=True)
            A.append(Aj.toarray())
            b.append(np.asarray(bj).ravel())
            q.append(q_all[:n, j])
        return np.stack(P), np.stack(q), np.stack(A), np.stack(b)

    def _theta(self, params) -> Tensor:
        """The stacked parameter vector ``(*batch, T + 1)`` in cvxpy's column order."""
        if len(params) != len(self.params):
            raise ValueError(f"expected {len(self.params)} parameter tensors, got {len(params)}")
        flats = []
        for i, (t, p) in enumerate(zip(params, self.params, strict=True)):
            name = f"parameter {p.name()} (argument {i})"  # the parameter's name, not the QP data's
            if not isinstance(t, Tensor) or tuple(t.shape[t.ndim - len(p.shape):]) != p.shape \
                    or t.ndim < len(p.shape):
                raise ValueError(f"{name} must have shape (*batch, {p.shape}), "
                                 f"got {tuple(getattr(t, 'shape', ()))}")
            check_tensor(name, t, finite=False)
            if not is_wrapped(t) and not all_finite(t):
                what = "NaN" if bool(torch.isnan(t).any()) else "inf"
                raise ValueError(f"{name} contains {what} (parameters enter the QP linearly, so they "
                                 f"must be finite; a bound of magnitude >= 1e20 means no bound)")
            flats.append(_fortran_flat(t, len(p.shape)) if p.shape else t.unsqueeze(-1))
        check_same_dtype_device({p.name(): t for t, p in zip(params, self.params, strict=True)})
        try:
            batch = torch.broadcast_shapes(*(f.shape[:-1] for f in flats))
        except RuntimeError as err:
            listed = ", ".join(f"{p.name()} {tuple(f.shape[:-1])}" for f, p in zip(flats, self.params))
            raise ValueError(f"batch dims do not broadcast: {listed}") from err
        order = sorted(range(len(flats)), key=lambda i: self.cols[i])  # cvxpy's column order
        parts = [flats[i].expand(*batch, flats[i].shape[-1]) for i in order]
        return torch.cat([*parts, params[0].new_ones(*batch, 1)], -1)

    def problem_data(self, *params: Tensor) -> tuple[Tensor, ...]:
        """``(Q, c, A, b, G, h, lower)`` of the canonical QP at the given parameter values
        (``lower`` is −inf on the one-sided rows)."""
        theta = self._theta(params)
        Q, c, A, b, G, h, lower = (torch.tensordot(theta, m.to(dtype=theta.dtype, device=theta.device),
                                                   dims=1) for m in self._maps())
        inf = torch.full((*lower.shape[:-1], G.shape[-2] - self.n_pairs), -float("inf"),
                         dtype=lower.dtype, device=lower.device)
        return Q, c, A, b, G, h, torch.cat([lower, inf], -1)

    def _maps(self) -> tuple[Tensor, ...]:
        return (self.P_map, self.q_map, self.A_map, self.b_map, self.G_map, self.h_map, self.lower_map)

    def forward(self, *params: Tensor) -> tuple[Tensor, ...]:
        Q, c, A, b, G, h, lower = self.problem_data(*params)
        k = self.n_pairs
        inspectable = not (is_wrapped(lower) or is_wrapped(h))
        # crossed bounds (infeasible): cvxpy's one-sided rows, which the layer takes as such
        if k and inspectable and bool((lower[..., :k] > h[..., :k]).any()):
            x, _, _ = self.layer(Q, c, A, b, torch.cat([G, -G[..., :k, :]], -2),
                                 torch.cat([h, -lower[..., :k]], -1))
        else:
            x, _, _ = self.layer(Q, c, A, b, G, h, lower=lower if k else None)
        return tuple(_fortran_unflat(x[..., col: col + v.size], v.shape) if v.shape else x[..., col]
                     for v, col in zip(self.variables, self.var_cols, strict=True))
