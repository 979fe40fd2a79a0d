"""A cvxpy front door for :class:`~implicit_layers.QPLayer`.

``QPLayer.from_cvxpy(problem, parameters=[...], variables=[...])`` compiles a parametrized
cvxpy problem once and returns a module that maps parameter tensors to the values of the
chosen variables, differentiably. cvxpy canonicalizes the problem (DPP) into

    min_x ½ xᵀP(θ)x + q(θ)ᵀx   s.t.  A_z(θ) x + b_z(θ) = 0,   A_+(θ) x + b_+(θ) ≥ 0

where every coefficient is affine in the stacked parameter vector ``θ``. The affine maps are
read off once (one probe per entry of ``θ`` plus the offset) and stored densely, so a call
is a few tensor contractions followed by the QP layer with

    Q = P,  c = q,  A = A_z,  b = −b_z,  G = −A_+,  h = b_+.

Problems that are not DPP QPs (second-order cones, exponentials, non-affine parameter use)
are rejected with a ``ValueError`` saying so.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from implicit_layers.checks import check_same_dtype_device, check_tensor


def _fortran_flat(t: Tensor, event_ndim: int) -> Tensor:
    """Flatten the last ``event_ndim`` dims in column-major order (cvxpy's layout)."""
    lead = t.ndim - event_ndim
    perm = (*range(lead), *reversed(range(lead, t.ndim)))
    return t.permute(perm).reshape(*t.shape[:lead], t.shape[lead:].numel())  # B = 0 too


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

    ``forward(*params)`` takes one tensor per parameter, shaped ``(*batch, *param.shape)``
    (leading dims broadcast), and returns a tuple with one tensor per variable.

    >>> import cvxpy as cp, torch, implicit_layers as il
    >>> x = cp.Variable(2); p = cp.Parameter(2)
    >>> prob = cp.Problem(cp.Minimize(cp.sum_squares(x - p)), [x >= 0])
    >>> layer = il.QPLayer.from_cvxpy(prob, parameters=[p], variables=[x])
    >>> layer(torch.tensor([1.0, -1.0], dtype=torch.float64))[0].round(decimals=6) + 0.0  # no -0.
    tensor([1., 0.], dtype=torch.float64)
    """

    def __init__(self, problem, parameters, variables, layer: nn.Module):
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
        self.n_eq, self.n_ineq = dims.zero, dims.nonneg
        self.cols = [prog.param_id_to_col[p.id] for p in params]
        self.var_cols = [prog.var_id_to_col[v.id] for v in variables]
        for name, t in zip(("P_map", "q_map", "A_map", "b_map"), self._affine_maps(prog), strict=True):
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

    def problem_data(self, *params: Tensor) -> tuple[Tensor, ...]:
        """``(Q, c, A, b, G, h)`` of the canonical QP at the given parameter values."""
        if len(params) != len(self.params):
            raise ValueError(f"expected {len(self.params)} parameter tensors, got {len(params)}")
        flats = []
        for t, p in zip(params, self.params, strict=True):
            check_tensor(p.name(), t)  # the parameter's own name, not the QP data's
            if tuple(t.shape[t.ndim - len(p.shape):]) != p.shape or t.ndim < len(p.shape):
                raise ValueError(f"parameter {p.name()} must have shape (*batch, {p.shape}), "
                                 f"got {tuple(t.shape)}")
            flats.append(_fortran_flat(t, len(p.shape)) if p.shape else t.unsqueeze(-1))
        check_same_dtype_device({p.name(): t for t, p in zip(params, self.params, strict=True)})
        ref = params[0]
        try:
            batch = torch.broadcast_shapes(*(f.shape[:-1] for f in flats))
        except RuntimeError as err:
            listed = ", ".join(f"{p.name()} {tuple(f.shape[:-1])}" for f, p in zip(flats, self.params))
            raise ValueError(f"batch dims do not broadcast: {listed}") from err
        order = sorted(range(len(flats)), key=lambda i: self.cols[i])  # cvxpy's column order
        parts = [flats[i].expand(*batch, flats[i].shape[-1]) for i in order]
        theta = torch.cat([*parts, ref.new_ones(*batch, 1)], -1)
        maps = (self.P_map, self.q_map, self.A_map, self.b_map)
        maps = [m.to(dtype=ref.dtype, device=ref.device) for m in maps]
        P, q, Acone, bcone = (torch.tensordot(theta, m, dims=1) for m in maps)
        e, k = self.n_eq, self.n_eq + self.n_ineq
        return P, q, Acone[..., :e, :], -bcone[..., :e], -Acone[..., e:k, :], bcone[..., e:k]

    def forward(self, *params: Tensor) -> tuple[Tensor, ...]:
        x, _, _ = self.layer(*self.problem_data(*params))
        return tuple(_fortran_unflat(x[..., col: col + v.size], v.shape) if v.shape else x[..., col]
                     for v, col in zip(self.variables, self.var_cols, strict=True))
