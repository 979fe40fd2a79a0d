"""OptNet-style 4×4 Sudoku (Amos & Kolter, 2017): reusable pieces, plain PyTorch.

* :func:`make_sudoku` generates solved boards and puzzles (one-hot, blanks all-zero).
* :class:`OptNetSudoku` is the paper's model: a single QP layer

      z* = argmin_z ½ ε‖z‖² − pᵀz   s.t.  A z = b,  z ≥ 0

  over the 64 one-hot cell/digit indicators, with the equality constraints ``A`` learned
  from data. ``b = A z₀`` with ``z₀ = ¼·𝟙`` (the uniform board, which satisfies every
  Sudoku equality), so the QP stays feasible whatever ``A`` becomes.
* :func:`train_sudoku` is a plain training loop (MSE to the solution, Adam) returning metrics.

The Hydra/Lightning experiment wraps these; they are importable without either.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor, nn

import implicit_layers as il

BASE_4X4 = torch.tensor([[0, 1, 2, 3], [2, 3, 0, 1], [1, 0, 3, 2], [3, 2, 1, 0]])


def random_solutions(count: int, generator: torch.Generator) -> Tensor:
    """``(count, 4, 4)`` digits 0..3 of valid boards: relabel digits, permute rows within
    bands, bands, columns within stacks and stacks, and transpose, all at random."""
    boards = []
    for _ in range(count):
        g = torch.randperm(4, generator=generator)[BASE_4X4]  # relabel the digits
        bands = torch.randperm(2, generator=generator)
        rows = torch.cat([2 * bands[i] + torch.randperm(2, generator=generator) for i in range(2)])
        stacks = torch.randperm(2, generator=generator)
        cols = torch.cat([2 * stacks[i] + torch.randperm(2, generator=generator) for i in range(2)])
        g = g[rows][:, cols]
        if bool(torch.randint(2, (), generator=generator)):
            g = g.T
        boards.append(g)
    return torch.stack(boards)


def make_sudoku(count: int, blanks: int = 8, seed: int = 0, dtype=torch.float64):
    """``(puzzles, solutions)`` one-hot ``(count, 4, 4, 4)``; ``blanks`` cells per puzzle are
    emptied (all-zero one-hot)."""
    gen = torch.Generator().manual_seed(seed)
    solutions = nn.functional.one_hot(random_solutions(count, gen), 4).to(dtype)
    keep = torch.ones(count, 16, dtype=dtype)
    for i in range(count):
        keep[i, torch.randperm(16, generator=gen)[:blanks]] = 0
    puzzles = solutions * keep.view(count, 4, 4, 1)
    return puzzles, solutions


def board_accuracy(pred: Tensor, solutions: Tensor) -> float:
    """Fraction of boards whose every cell's argmax digit is right."""
    right = (pred.argmax(-1) == solutions.argmax(-1)).flatten(1).all(-1)
    return float(right.double().mean())


class OptNetSudoku(nn.Module):
    """One QP layer with learned equality constraints (OptNet's Sudoku model).

    Args:
        n_eq: number of learned equality constraints (the true 4×4 Sudoku has 40, rank 28).
        eps: the small quadratic penalty ``ε`` that makes the QP strictly convex.
        solver: the QP layer's solver (default interior point).

    >>> import torch
    >>> from experiments.tasks.sudoku import OptNetSudoku, make_sudoku
    >>> puzzles, _ = make_sudoku(2, seed=0)
    >>> OptNetSudoku(n_eq=40)(puzzles).shape
    torch.Size([2, 4, 4, 4])
    """

    def __init__(self, n_eq: int = 40, eps: float = 0.1, solver=None, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.A = nn.Parameter(torch.rand(n_eq, 64, generator=gen, dtype=torch.float64))
        self.eps = eps
        self.qp = il.QPLayer(solver=solver)

    def forward(self, puzzles: Tensor) -> Tensor:
        n = 64
        p = puzzles.reshape(-1, n)
        Q = self.eps * torch.eye(n, dtype=p.dtype)
        b = self.A.sum(-1) / 4  # A z₀ with z₀ = ¼·𝟙
        G, h = -torch.eye(n, dtype=p.dtype), torch.zeros(n, dtype=p.dtype)
        z, _, _ = self.qp(Q, -p, self.A.to(p.dtype), b.to(p.dtype), G, h)
        return z.reshape(puzzles.shape)


def train_sudoku(model: OptNetSudoku, train, test, epochs: int = 10, batch_size: int = 50,
                 lr: float = 0.1, seed: int = 0) -> dict:
    """Adam on the MSE to the solution; returns losses, board accuracies and wall time."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    (xtr, ytr), (xte, yte) = train, test
    start, losses = time.perf_counter(), []
    for _ in range(epochs):
        order = torch.randperm(len(xtr), generator=gen)
        for i in range(0, len(xtr), batch_size):
            idx = order[i: i + batch_size]
            loss = nn.functional.mse_loss(model(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    with torch.no_grad():
        test_acc = board_accuracy(model(xte), yte)
        train_acc = board_accuracy(model(xtr), ytr)
    return {"losses": losses, "train_board_acc": train_acc, "test_board_acc": test_acc,
            "seconds": time.perf_counter() - start}
