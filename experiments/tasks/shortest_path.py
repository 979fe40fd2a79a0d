"""Decision-focused learning on PyEPO's shortest path, every LP solved by our layers.

From features ``φ`` a linear model predicts the arc costs ``ĉ`` of a grid; the decision is the
shortest path ``x*(ĉ) = argmin ĉᵀx`` over the flow polytope
(:func:`implicit_layers.testing.lp_problems.shortest_path_lp`, with the redundant conservation
row dropped: with it, the interior point ended about a third of these LPs ``NUMERICAL``).
Since ``x*`` is piecewise constant, training goes through a surrogate, ``il.PerturbedLP`` or
``il.SmoothedLP``, with its Fenchel–Young loss towards the true shortest path or the true cost
of its decision.
Data: ``pyepo.data.shortestpath.genData`` (costs polynomial of degree ``deg`` in the features,
so a linear model is misspecified for ``deg > 1``, times uniform noise of half-width
``noise_width``).

Scored by PyEPO's normalized regret ``Σᵢ (cᵢᵀx*(ĉᵢ) − cᵢᵀx*(cᵢ)) / Σᵢ |cᵢᵀx*(cᵢ)|`` on the
test split, next to, on identical splits: the two-stage baseline (least squares for ``c``,
then optimize), PyEPO's SPO+ (``pyepo.func.SPOPlus`` with its OR-Tools shortest-path model,
trained with the same optimizer, epochs and batch size), and the oracle that knows the
noise-free costs ``E[c | φ]`` (the Bayes-optimal decision for a linear objective, so its
regret bounds every predictor's from below, in expectation).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

import implicit_layers as il
from experiments.tasks.data import TensorDataModule
from experiments.tasks.module import TaskModule
from implicit_layers.testing.lp_problems import shortest_path_lp

LOSSES = ("fenchel_young", "decision")


def solve_lp(c: Tensor, lp: tuple[Tensor, ...], solver=None) -> Tensor:
    """Shortest paths ``x*(c)`` for each row of ``c`` (our interior point, ``Q = 0``), no gradient."""
    n = c.shape[-1]
    with torch.no_grad():
        return il.QPLayer(solver=solver)(c.new_zeros(n, n), c, *lp)[0]


def regret_sums(x: Tensor, c: Tensor, x_best: Tensor) -> tuple[float, float]:
    """``(Σᵢ cᵢᵀxᵢ − cᵢᵀx*ᵢ, Σᵢ |cᵢᵀx*ᵢ|)``: their ratio is PyEPO's normalized regret."""
    best = (c * x_best).sum(-1)
    return float(((c * x).sum(-1) - best).sum()), float(best.abs().sum())


def expected_costs(features: np.ndarray, n_arcs: int, deg: int, seed: int) -> np.ndarray:
    """The noise-free costs ``E[c | φ]`` of ``genData``: its first draw is the 0/1 matrix ``B``,
    and ``c = ((Bφ/√p + 3)^deg + 1) / 3.5^deg · ε`` with ``E[ε] = 1``."""
    B = np.random.RandomState(seed).binomial(1, 0.5, (n_arcs, features.shape[1]))
    return ((features @ B.T / np.sqrt(features.shape[1]) + 3) ** deg + 1) / 3.5**deg


class ShortestPathDataModule(TensorDataModule):
    """PyEPO shortest-path data: batches ``(φ, c, x*(c), E[c | φ])`` in float64.

    One ``genData`` call draws ``n_train + n_val + n_test`` instances, split in that order.

    Args:
        grid: the grid's (rows, cols). n_features: ``p``. deg: polynomial degree.
        noise_width: half-width of the multiplicative noise. n_train, n_val, n_test: sizes.
        batch_size, eval_batch_size, seed: see :class:`~experiments.tasks.data.TensorDataModule`;
            ``seed`` also seeds ``genData``.
    """

    def __init__(self, grid=(5, 5), n_features: int = 5, deg: int = 4, noise_width: float = 0.5,
                 n_train: int = 1000, n_val: int = 200, n_test: int = 1000, batch_size: int = 32,
                 eval_batch_size: int | None = None, seed: int = 0):
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, seed=seed)
        if min(n_train, n_val, n_test) < 1:
            raise ValueError(f"n_train, n_val and n_test must be >= 1, got {n_train}, {n_val}, {n_test}")
        self.grid, self.n_features, self.deg, self.noise_width = tuple(grid), n_features, deg, noise_width
        self.sizes = (n_train, n_val, n_test)
        self.lp = shortest_path_lp(self.grid)

    def make_splits(self):
        from pyepo.data.shortestpath import genData

        phi, c = genData(sum(self.sizes), self.n_features, self.grid, deg=self.deg,
                         noise_width=self.noise_width, seed=self.seed)
        mean = expected_costs(phi, c.shape[1], self.deg, self.seed)
        phi, c, mean = (torch.as_tensor(np.asarray(t, dtype=np.float64)) for t in (phi, c, mean))
        x = solve_lp(c, self.lp)
        bounds = np.cumsum((0, *self.sizes))
        return tuple((phi[i:j], c[i:j], x[i:j], mean[i:j]) for i, j in zip(bounds[:-1], bounds[1:]))


def train_spo_plus(phi: Tensor, c: Tensor, x: Tensor, grid, *, epochs: int, lr: float,
                   batch_size: int, seed: int, max_steps: int | None = None) -> nn.Linear:
    """A linear cost model trained with PyEPO's SPO+ loss and its OR-Tools shortest-path model
    (Adam, the given epochs and batch size, at most ``max_steps`` steps), in float32 as PyEPO
    computes."""
    from pyepo.func import SPOPlus
    from pyepo.model.ort import shortestPathModel

    spo = SPOPlus(shortestPathModel(tuple(grid)), processes=1)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = nn.Linear(phi.shape[1], c.shape[1])
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    phi, c, x = phi.float(), c.float(), x.float()
    z = (c * x).sum(-1, keepdim=True)
    gen = torch.Generator().manual_seed(seed)
    batches = [idx for _ in range(epochs)
               for idx in torch.randperm(len(phi), generator=gen).split(batch_size)]
    for idx in batches[:max_steps]:
        loss = spo(model(phi[idx]), c[idx], x[idx], z[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


class DecisionFocusedShortestPath(TaskModule):
    """A linear arc-cost predictor trained end to end through an LP surrogate.

    Args:
        surrogate: ``il.PerturbedLP`` or ``il.SmoothedLP`` (built by the config).
        loss: ``"fenchel_young"`` (the surrogate's Fenchel–Young loss towards the true
            shortest path ``x*(c)``) or ``"decision"`` (the true cost ``cᵀx̃(ĉ)`` of the
            surrogate's decision).
        n_features, grid: the predictor's input size and the grid.
        spo_plus: settings of the SPO+ baseline, ``{epochs, lr, batch_size}``.
        solver: the LP solver used to score decisions (default ``il.InteriorPoint()``).
        optimizer, scheduler, interval: see :class:`~experiments.tasks.module.TaskModule`.
    """

    def __init__(self, optimizer, surrogate: nn.Module, loss: str = "fenchel_young",
                 n_features: int = 5, grid=(5, 5), spo_plus: dict | None = None, solver=None,
                 scheduler=None, interval: str = "epoch"):
        super().__init__(optimizer, scheduler, interval)
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        if loss == "fenchel_young" and not hasattr(surrogate, "fenchel_young_loss"):
            raise ValueError("loss='fenchel_young' needs a surrogate with a fenchel_young_loss "
                             f"(PerturbedLP, SmoothedLP), got {type(surrogate).__name__}")
        self.surrogate, self.loss_name, self.solver = surrogate, loss, solver
        self.grid, self.spo_plus = tuple(grid), dict(spo_plus or {"epochs": 10, "lr": 0.01, "batch_size": 32})
        for i, t in enumerate(shortest_path_lp(self.grid)):
            self.register_buffer(f"lp{i}", t, persistent=False)
        self.predict = nn.Linear(n_features, self.lp0.shape[1], dtype=torch.float64)
        self._sums: dict[str, list[float]] = {}

    @property
    def lp(self) -> tuple[Tensor, ...]:
        return self.lp0, self.lp1, self.lp2, self.lp3

    def surrogate_loss(self, phi: Tensor, c: Tensor, x: Tensor) -> Tensor:
        """The training loss of a batch: features, true costs, true shortest paths."""
        c_hat = self.predict(phi)
        if self.loss_name == "fenchel_young":
            return self.surrogate.fenchel_young_loss(c_hat, x, *self.lp).mean()
        return (self.surrogate(c_hat, *self.lp) * c).sum(-1).mean()

    def training_step(self, batch, _idx):
        phi, c, x, _ = batch
        loss = self.surrogate_loss(phi, c, x)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def _accumulate(self, name: str, c_pred: Tensor, c: Tensor, x_best: Tensor) -> None:
        num, den = regret_sums(solve_lp(c_pred.detach(), self.lp, self.solver), c, x_best)
        sums = self._sums.setdefault(name, [0.0, 0.0])
        sums[0], sums[1] = sums[0] + num, sums[1] + den

    def _regrets(self) -> dict[str, float]:
        regrets = {k: num / den for k, (num, den) in self._sums.items()}
        self._sums = {}
        return regrets

    def validation_step(self, batch, _idx):
        phi, c, x, _ = batch
        self._accumulate("val_regret", self.predict(phi), c, x)

    def on_validation_epoch_end(self):
        self.log_dict(self._regrets())

    def on_test_epoch_start(self):
        """Fit the baselines on the training split: least squares, and SPO+."""
        phi, c, x, _ = self.trainer.datamodule.splits["train"].tensors
        design = torch.cat([phi, torch.ones(len(phi), 1, dtype=phi.dtype)], dim=1)
        self.two_stage = torch.linalg.lstsq(design, c).solution
        with torch.inference_mode(False), torch.enable_grad():  # the test loop disables autograd
            self.spo_plus_model = train_spo_plus(phi, c, x, self.grid, seed=self.trainer.datamodule.seed,
                                                 max_steps=1 if self.trainer.fast_dev_run else None,
                                                 **self.spo_plus)

    def test_step(self, batch, _idx):
        phi, c, x, mean = batch
        ones = torch.ones(len(phi), 1, dtype=phi.dtype, device=phi.device)
        with torch.no_grad():
            spo = self.spo_plus_model(phi.float()).to(c)
        self._accumulate("test_regret", self.predict(phi), c, x)
        self._accumulate("two_stage_regret", torch.cat([phi, ones], 1) @ self.two_stage.to(c), c, x)
        self._accumulate("spo_plus_regret", spo, c, x)
        self._accumulate("oracle_regret", mean, c, x)

    def on_test_epoch_end(self):
        r = self._regrets()
        # oracle_ratio: the two_stage_ratio of the Bayes-optimal decisions, which no predictor
        # of the costs can beat in expectation
        self.log_dict({**r, "spo_plus_ratio": r["test_regret"] / r["spo_plus_regret"],
                       "two_stage_ratio": r["test_regret"] / r["two_stage_regret"],
                       "oracle_ratio": r["oracle_regret"] / r["two_stage_regret"]})
