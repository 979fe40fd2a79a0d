"""Informative gradients for linear programs.

The solution of an LP

    x*(c) = argmin_x cᵀx   s.t.  Ax = b,  Gx ≤ h

is piecewise constant in the cost ``c``: its true derivative is zero almost everywhere (and
undefined where the optimal vertex switches), so a loss of ``x*(ĉ)`` teaches a cost predictor
``ĉ`` nothing. Two classic surrogates replace ``x*`` by a smooth map whose derivative is
informative; both solve every LP with :class:`~implicit_layers.QPLayer` (``Q = 0`` or ``γI``).

* :class:`SmoothedLP` (quadratic smoothing, Wilder, Dilkina & Tambe, AAAI 2019):
  ``x_γ(c) = argmin_x cᵀx + ½γ‖x‖²`` over the same polytope. A strictly convex QP, its
  solution is continuous and piecewise affine in ``c``, and :class:`QPLayer` returns its
  exact implicit gradient (with respect to every input). As ``γ → 0`` it approaches an optimal
  vertex; a larger ``γ`` gives smoother, more biased decisions.
* :class:`PerturbedLP` (perturbed optimizers, Berthet et al., NeurIPS 2020):
  ``y_σ(c) = E_Z[x*(c + σZ)]`` with ``Z ~ N(0, I)``, the expected solution under Gaussian
  noise on the cost. It is smooth in ``c`` and its Jacobian is an expectation of solutions
  (see the class), estimated by Monte Carlo from the same solves as the value. It also gives
  the Fenchel–Young loss, whose gradient needs no Jacobian at all.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from implicit_layers.checks import check_tensor
from implicit_layers.layers.qp.layer import QPLayer
from implicit_layers.solvers.qp.base import QPSolver


def _positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def _identity_like(c: Tensor, scale: float) -> Tensor:
    n = c.shape[-1]
    return scale * torch.eye(n, dtype=c.dtype, device=c.device)


class SmoothedLP(nn.Module):
    """Quadratically smoothed LP ``x_γ(c) = argmin cᵀx + ½γ‖x‖² s.t. Ax = b, Gx ≤ h``.

    A strictly convex QP solved by :class:`~implicit_layers.QPLayer` with ``Q = γI``; its
    gradient is the exact implicit gradient of that QP (Wilder et al. 2019), with respect to
    ``c`` and to the constraints alike. The surrogate's bias is set by ``γ`` relative to the
    scale of ``c``: ``x_γ(c) = x_1(c / γ)``.

    Args:
        gamma: the smoothing weight ``γ > 0``.
        solver: the QP solver (default :class:`~implicit_layers.InteriorPoint`).
        on_failure: ``"raise"`` (default) or ``"warn"``, as for :class:`~implicit_layers.QPLayer`.

    ``forward(c, A=None, b=None, G=None, h=None) -> x`` with ``c (*, n)`` and the constraints
    shaped as for :class:`~implicit_layers.QPLayer`; leading dims broadcast. The solver's
    statistics are in ``layer.qp.stats``.

    >>> import torch, implicit_layers as il
    >>> c = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    >>> A, b = torch.ones(1, 2, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    >>> G, h = -torch.eye(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    >>> x = il.SmoothedLP(gamma=2.0)(c, A, b, G, h)     # the LP's vertex would be (1, 0)
    >>> x.detach().round(decimals=6)
    tensor([0.7500, 0.2500], dtype=torch.float64)
    >>> torch.autograd.grad(x[0], c)[0].round(decimals=6)
    tensor([-0.2500,  0.2500], dtype=torch.float64)
    """

    def __init__(self, gamma: float = 1.0, solver: QPSolver | None = None,
                 on_failure: str = "raise"):
        super().__init__()
        self.gamma = _positive("gamma", gamma)
        self.qp = QPLayer(solver=solver, on_failure=on_failure)

    def forward(self, c: Tensor, A: Tensor | None = None, b: Tensor | None = None,
                G: Tensor | None = None, h: Tensor | None = None) -> Tensor:
        c = check_tensor("c", c, min_ndim=1)
        return self.qp(_identity_like(c, self.gamma), c, A, b, G, h)[0]

    def fenchel_young_loss(self, c: Tensor, target: Tensor, A=None, b=None, G=None, h=None) -> Tensor:
        """Fenchel–Young loss of the quadratic regularizer, per sample (Blondel et al. 2020):

            L(c; w) = cᵀw + ½γ‖w‖² − min_x (cᵀx + ½γ‖x‖²)   over the polytope,

        ``≥ 0`` for a feasible target ``w``, zero iff ``x_γ(c) = w``; convex in ``c`` with
        gradient ``w − x_γ(c)`` (Danskin), so it needs no derivative of the QP. Gradients
        flow to ``c`` and ``target``.

        >>> import torch, implicit_layers as il
        >>> c = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
        >>> A, b = torch.ones(1, 2, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
        >>> G, h = -torch.eye(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
        >>> w = torch.tensor([0.0, 1.0], dtype=torch.float64)
        >>> loss = il.SmoothedLP(gamma=2.0).fenchel_young_loss(c, w, A, b, G, h)
        >>> torch.autograd.grad(loss, c)[0].round(decimals=6)   # w − x_γ(c) = w − (0.75, 0.25)
        tensor([-0.7500,  0.7500], dtype=torch.float64)
        """
        target = check_tensor("target", target, min_ndim=1)
        with torch.no_grad():
            x = self(c, A, b, G, h)
        # min_x (cᵀx + ½γ‖x‖²) in value at the minimizer x, held fixed: by Danskin its derivative
        # in c is x (the derivative through x vanishes at the minimum).
        regularized = lambda v, c: (c * v).sum(-1) + 0.5 * self.gamma * v.square().sum(-1)  # noqa: E731
        return regularized(target, c) - regularized(x, c)


class PerturbedLP(nn.Module):
    """Perturbed LP ``y_σ(c) = E[x*(c + σZ)]``, ``Z ~ N(0, I)``, with its Monte-Carlo gradient.

    With ``p`` the standard normal density, ``y_σ(c) = ∫ x*(u) p((u − c)/σ) σ⁻ⁿ du`` and
    ``∇_c p((u − c)/σ) = p((u − c)/σ) (u − c)/σ²``, so (Berthet et al. 2020, Prop. 3.1)

        J = ∂y_σ/∂c = (1/σ) E[x*(c + σZ) Zᵀ]

    although ``x*`` itself is piecewise constant. Each call draws ``samples`` noise vectors
    ``Zₛ`` per sample, solves the ``samples × batch`` LPs in one batched
    :class:`~implicit_layers.QPLayer` call (``Q = 0``) outside autograd, and returns the
    Monte-Carlo mean ``ŷ = (1/S) Σₛ x*(c + σZₛ)``, whose gradient is the estimator
    ``Ĵ = (1/(σS)) Σₛ x*(c + σZₛ) Zₛᵀ`` from the same solves (no extra solve in the backward).

    With ``variance_reduction=True`` (default) each ``Xₛ`` is centred by the mean of the
    other samples, ``X̄₋ₛ``, which is independent of ``Zₛ``: since ``E[Zₛ] = 0`` the estimator
    stays unbiased, and it simplifies to ``Ĵ = (1/(σ(S − 1))) Σₛ (Xₛ − X̄) Zₛᵀ`` (``X̄`` the
    mean of all samples). It removes the term ``E[x] Zᵀ`` whose mean is zero but whose
    spread grows like ``‖E[x]‖ / σ``.

    Gradients flow to ``c`` only: constraints that require grad raise ``ValueError``. Double
    backward returns zero (the estimator ``Ĵ`` does not depend on ``c`` once drawn), and
    ``torch.func.vmap`` needs the noise passed in (random draws are not batched).

    Args:
        sigma: the noise scale ``σ > 0`` (relative to the scale of ``c``).
        samples: Monte-Carlo samples ``S`` per call (at least 2 with ``variance_reduction``).
        variance_reduction: centre the samples by the leave-one-out mean in the gradient.
        seed: seeds the layer's own noise generator (one per device, created on first use);
            a run is reproducible, successive calls draw fresh noise.
        generator: a ``torch.Generator`` to draw from instead (on ``c``'s device).
        solver: the LP solver (default :class:`~implicit_layers.InteriorPoint`).
        on_failure: ``"raise"`` (default) or ``"warn"``, as for :class:`~implicit_layers.QPLayer`.

    ``forward(c, A=None, b=None, G=None, h=None, *, noise=None) -> y`` with ``c (*, n)``;
    ``noise (S, *c.shape)`` replaces the draw (common random numbers, tests). The statistics
    of the latest batch of LP solves are in ``layer.qp.stats``.

    >>> import torch, implicit_layers as il
    >>> c = torch.tensor([1.0, 1.2], dtype=torch.float64, requires_grad=True)
    >>> A, b = torch.ones(1, 2, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    >>> G, h = -torch.eye(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    >>> layer = il.PerturbedLP(sigma=0.5, samples=1000, seed=0)
    >>> y = layer(c, A, b, G, h)    # exact: P(x* = eᵢ) = Φ(±0.2 / (0.5 √2)) = 0.61, 0.39
    >>> y.detach().round(decimals=1)
    tensor([0.6000, 0.4000], dtype=torch.float64)
    >>> torch.autograd.grad(y[0], c)[0].round(decimals=1)   # exact: ∓0.54
    tensor([-0.5000,  0.5000], dtype=torch.float64)
    """

    def __init__(self, sigma: float = 1.0, samples: int = 8, *, variance_reduction: bool = True,
                 seed: int = 0, generator: torch.Generator | None = None,
                 solver: QPSolver | None = None, on_failure: str = "raise"):
        super().__init__()
        self.sigma = _positive("sigma", sigma)
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ValueError(f"samples must be a positive integer, got {samples!r}")
        if variance_reduction and samples < 2:
            raise ValueError("samples must be >= 2 with variance_reduction=True (a leave-one-out mean)")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        self.samples, self.variance_reduction = samples, bool(variance_reduction)
        self.seed, self.generator = int(seed), generator
        self._generators: dict[torch.device, torch.Generator] = {}
        self.qp = QPLayer(solver=solver, on_failure=on_failure)

    def draw(self, c: Tensor) -> Tensor:
        """Standard normal noise ``(samples, *c.shape)`` from the layer's generator."""
        gen = self.generator
        if gen is None:
            if c.device not in self._generators:
                self._generators[c.device] = torch.Generator(c.device).manual_seed(self.seed)
            gen = self._generators[c.device]
        return torch.randn((self.samples, *c.shape), generator=gen, dtype=c.dtype, device=c.device)

    def solve(self, c: Tensor, A: Tensor | None = None, b: Tensor | None = None,
              G: Tensor | None = None, h: Tensor | None = None, *,
              noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(X, Z)``: the solutions ``X[s] = x*(c + σZ[s])`` and the noise ``Z``, no gradient."""
        c = check_tensor("c", c, min_ndim=1)
        for name, t in (("A", A), ("b", b), ("G", G), ("h", h)):
            if isinstance(t, Tensor) and t.requires_grad:
                raise ValueError(f"{name} requires grad, but PerturbedLP differentiates with "
                                 "respect to c only (use SmoothedLP for constraint gradients)")
        if noise is None:
            noise = self.draw(c)
        elif not isinstance(noise, Tensor) or noise.ndim != c.ndim + 1 or noise.shape[1:] != c.shape:
            raise ValueError(f"noise must have shape (S, *c.shape) = (S, {', '.join(map(str, c.shape))}), "
                             f"got {tuple(getattr(noise, 'shape', ()))}")
        with torch.no_grad():
            X = self.qp(_identity_like(c, 0.0), c.detach() + self.sigma * noise, A, b, G, h)[0]
        return X, noise

    def forward(self, c: Tensor, A: Tensor | None = None, b: Tensor | None = None,
                G: Tensor | None = None, h: Tensor | None = None, *,
                noise: Tensor | None = None) -> Tensor:
        X, Z = self.solve(c, A, b, G, h, noise=noise)
        # Value-preserving construction of the estimator (no autograd.Function): with
        # δ = c − c.detach(), whose value is exactly 0 and whose derivative is the identity,
        #     y = ŷ + (1/(σS')) Σₛ X'ₛ ⟨Zₛ, δ⟩,   X'ₛ = Xₛ, S' = S   (X'ₛ = Xₛ − ŷ, S' = S − 1)
        # equals ŷ in value, and its pushforward is ẏ = (1/(σS')) Σₛ X'ₛ ⟨Zₛ, ċ⟩ = Ĵ ċ; the
        # pullback of ȳ is c̄ = (1/(σS')) Σₛ Zₛ ⟨X'ₛ, ȳ⟩ = Ĵᵀ ȳ. O(S·n) memory per sample: Ĵ is
        # never formed.
        y_hat = X.mean(0)
        if self.variance_reduction:
            X, count = X - y_hat, self.samples - 1
        else:
            count = self.samples
        delta = c - c.detach()
        return y_hat + (X * (Z * delta).sum(-1, keepdim=True)).sum(0) / (self.sigma * count)

    def fenchel_young_loss(self, c: Tensor, target: Tensor, A=None, b=None, G=None, h=None, *,
                           noise=None) -> Tensor:
        """Perturbed Fenchel–Young loss ``⟨c, w⟩ − F̂(c)`` per sample (Berthet et al. 2020, §4).

        ``F(c) = E[min_x (c + σZ)ᵀx]`` is concave with ``∇F = y_σ(c)`` (Danskin), so the loss is
        convex in ``c`` with gradient ``w − y_σ(c)``: it pulls the expected solution towards
        the target solution ``w`` without differentiating the solutions. ``F̂`` is the
        Monte-Carlo mean over the same draws as :meth:`forward` (the loss omits the constant
        ``Ω(w)``; ``E[F̂(c)] ≤ min_x cᵀx ≤ cᵀw`` for feasible ``w``, so its mean is ≥ 0).

        >>> import torch, implicit_layers as il
        >>> c = torch.tensor([1.0, 1.2], dtype=torch.float64, requires_grad=True)
        >>> A, b = torch.ones(1, 2, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
        >>> G, h = -torch.eye(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
        >>> w = torch.tensor([0.0, 1.0], dtype=torch.float64)     # the better vertex for the truth
        >>> loss = il.PerturbedLP(0.5, samples=1000).fenchel_young_loss(c, w, A, b, G, h)
        >>> torch.autograd.grad(loss, c)[0].round(decimals=1)     # w − y_σ(c), exact ∓0.61
        tensor([-0.6000,  0.6000], dtype=torch.float64)
        """
        target = check_tensor("target", target, min_ndim=1)
        X, Z = self.solve(c, A, b, G, h, noise=noise)
        # F̂(c) = (1/S) Σₛ ⟨c + σZₛ, Xₛ⟩ in value; by Danskin its derivative is ŷ = (1/S) Σₛ Xₛ
        # (each Xₛ is a minimizer, held fixed): added as ⟨δ, ŷ⟩ with δ = c − c.detach() = 0.
        y_hat = X.mean(0)
        f_hat = ((c.detach() + self.sigma * Z) * X).sum(-1).mean(0) + ((c - c.detach()) * y_hat).sum(-1)
        return (c * target).sum(-1) - f_hat
