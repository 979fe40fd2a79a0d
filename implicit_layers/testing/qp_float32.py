"""float32 against float64 gradients of a QP layer, and the floor an exact float32 solve reaches.

The problems are strictly complementary random QPs (about half the inequalities active) whose
data is rounded to float32; the float64 reference solves the *same* rounded data in float64,
so every difference comes from the computation's precision. The floor is the exact
active-set derivative system (:func:`~implicit_layers.testing.qp_problems.active_set_gradients`,
``torch.linalg.solve`` on the true active set) evaluated in float32 at the float64 solution
rounded to float32: what a float32 computation that knew the active set would reach.
"""

from __future__ import annotations

import torch

from implicit_layers.testing.qp_problems import active_set_gradients, strictly_complementary_qp

NAMES = ("Q", "c", "G", "h")


def float32_problems(batch: int = 8, n: int = 40, m: int = 40, seed: int = 0):
    """``(data32, data64, x̄32, x̄64)``: ``(Q, c, G, h)`` in float32, the same values in float64,
    and a random cotangent of ``x`` in both dtypes."""
    (Q, c, _, _, G, h), _ = strictly_complementary_qp(batch=(batch,), n=n, m=m, p=0, seed=seed)
    data32 = tuple(t.float() for t in (Q, c, G, h))
    x_bar = torch.randn(batch, n, generator=torch.Generator().manual_seed(seed + 1)).float()
    return data32, tuple(t.double() for t in data32), x_bar, x_bar.double()


def relative(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample ``‖a − b‖ / ‖b‖`` over every trailing dim (``a`` cast to ``b``'s dtype)."""
    d = (a.to(b.dtype) - b).flatten(1).norm(dim=1)
    return d / b.flatten(1).norm(dim=1)


def layer_gradients(layer, data, x_bar) -> torch.Tensor:
    """``(B, k)``: the gradients of ``⟨x̄, x*⟩`` in ``(Q, c, G, h)``, flattened per sample."""
    args = [t.clone().requires_grad_() for t in data]
    x = layer(args[0], args[1], None, None, args[2], args[3])[0]
    grads = torch.autograd.grad((x * x_bar).sum(), args)
    return torch.cat([g.flatten(1) for g in grads], 1)


def layer_tangents(layer, data, tangents) -> torch.Tensor:
    """``(B, n)``: the JVP of ``x*`` along ``tangents`` of ``(Q, c, G, h)`` (torch.func.jvp)."""
    def f(Q, c, G, h):
        return layer(Q, c, None, None, G, h)[0]

    return torch.func.jvp(f, tuple(data), tuple(tangents))[1]


def floor_gradients(data32, data64, x_bar32, layer64) -> torch.Tensor:
    """``(B, k)``: the exact active-set gradients (``Q, c, G, h``) computed in float32 at the
    float64 solution (of ``layer64``) rounded to float32."""
    Q, c, G, h = data64
    x, _, mu = layer64(Q, c, None, None, G, h)
    A32 = data32[0].new_zeros(Q.shape[0], 0, Q.shape[-1])
    Q32, c32, G32, h32 = data32
    grads = active_set_gradients(Q32, c32, A32, A32[..., 0], G32, h32, x.float(),
                                 mu.new_zeros(Q.shape[0], 0).float(), mu.float(), x_bar32)
    Q_bar, c_bar, _, _, G_bar, h_bar = grads
    return torch.cat([g.flatten(1) for g in (Q_bar, c_bar, G_bar, h_bar)], 1)


def reference_gradients(data64, x_bar64, layer64) -> torch.Tensor:
    """The same exact active-set gradients in float64."""
    Q, c, G, h = data64
    x, _, mu = layer64(Q, c, None, None, G, h)
    A = Q.new_zeros(Q.shape[0], 0, Q.shape[-1])
    Q_bar, c_bar, _, _, G_bar, h_bar = active_set_gradients(
        Q, c, A, A[..., 0], G, h, x, mu.new_zeros(Q.shape[0], 0), mu, x_bar64)
    return torch.cat([g.flatten(1) for g in (Q_bar, c_bar, G_bar, h_bar)], 1)
