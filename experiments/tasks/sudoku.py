"""Learning the rules of 4×4 Sudoku with a QP layer, as OptNet did (Amos & Kolter, 2017).

A board is the 64 one-hot cell/digit indicators ``z`` (``z[r, c, d] = 1``: cell ``(r, c)``
holds digit ``d``); a puzzle ``p`` is its solution with some cells emptied (all-zero). The
model is a single QP layer,

    z*(p) = argmin_z ½ ε‖z‖² − pᵀz   s.t.  A z = A z₀,  z ≥ 0,

whose equality constraints ``A`` start at random and are learned from (puzzle, solution)
pairs alone, by the mean squared error of ``z*`` to the solution. ``z₀ = ¼·𝟙`` is the uniform
board, which satisfies every Sudoku equality, so the QP is feasible whatever ``A`` becomes.
With the true rules (:func:`sudoku_constraints`) the layer solves the puzzles outright.

The puzzles are drawn from all 288 valid 4×4 boards (:func:`all_boards`), with ``blanks``
cells emptied at random and, by default, only puzzles with a unique completion kept (with 8
blanks, ~20% of random puzzles have several, which caps any model's board accuracy).

The shipped config learns the rules to test board accuracy 1.0 in 10 epochs (~20 s on one
CPU thread), as OptNet reports for 4×4 (test error → 0). Its interior point stops on the
central path (``tol = 1e-3``, 4 iterations): the backward then differentiates a slightly
barrier-smoothed QP, which learned 2-3× faster per epoch than the exact (``1e-12``) solution.
"""

from __future__ import annotations

from functools import cache
from itertools import permutations

import torch
import torch.nn.functional as nnf
from torch import Tensor, nn

import implicit_layers as il
from experiments.tasks.data import TensorDataModule, split_indices
from experiments.tasks.module import TaskModule

CELLS = 16  # a 4×4 board
DIGITS = 4


@cache
def all_boards() -> Tensor:
    """The 288 valid 4×4 Sudoku boards ``(288, 4, 4)``, digits 0..3, by backtracking."""
    rows = [torch.tensor(p) for p in permutations(range(DIGITS))]
    boards = []

    def extend(board: list[Tensor]) -> None:
        if len(board) == DIGITS:
            boards.append(torch.stack(board))
            return
        r = len(board)
        for row in rows:
            clash = any(bool((row == other).any()) for other in board)
            if r % 2 == 1:  # the 2×2 boxes of this band: the pair above holds the other digits
                above = board[r - 1]
                clash = clash or any(set(row[j:j + 2].tolist()) & set(above[j:j + 2].tolist())
                                     for j in (0, 2))
            if not clash:
                extend([*board, row])

    extend([])
    return torch.stack(boards)


def sudoku_constraints() -> Tensor:
    """The 64 × 64 matrix ``A`` of the true rules, ``A z = 𝟙`` (one digit per cell; each digit
    once per row, column and box). Its rank is 40: some rules imply others (OptNet learns
    a random 40 × 64 ``A`` in their place)."""
    z = torch.arange(CELLS * DIGITS).view(DIGITS, DIGITS, DIGITS)  # (row, col, digit) -> index
    groups = [z[r, c, :] for r in range(4) for c in range(4)]
    groups += [z[r, :, d] for r in range(4) for d in range(4)]
    groups += [z[:, c, d] for c in range(4) for d in range(4)]
    groups += [z[r:r + 2, c:c + 2, d].flatten() for r in (0, 2) for c in (0, 2) for d in range(4)]
    A = torch.zeros(len(groups), CELLS * DIGITS)
    for i, idx in enumerate(groups):
        A[i, idx] = 1.0
    return A


def make_sudoku(count: int, blanks: int = 8, seed: int = 0, unique: bool = True,
                dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """``(puzzles, solutions)``, one-hot ``(count, 4, 4, 4)``; each puzzle has ``blanks``
    emptied (all-zero) cells, and with ``unique`` exactly one valid completion."""
    if not 0 <= blanks <= CELLS:
        raise ValueError(f"blanks must lie in [0, {CELLS}], got {blanks}")
    gen = torch.Generator().manual_seed(seed)
    boards = all_boards().flatten(1)  # (288, 16)
    solutions = boards[torch.randint(len(boards), (count,), generator=gen)]
    keep = torch.ones(count, CELLS, dtype=torch.bool)
    todo = torch.arange(count)
    while todo.numel():  # draw masks; redraw those whose puzzle has several completions
        keep[todo] = True
        blank = torch.rand(todo.numel(), CELLS, generator=gen).argsort(-1)[:, :blanks]
        keep[todo[:, None], blank] = False
        if not unique:
            break
        fits = ((boards[None] == solutions[todo, None]) | ~keep[todo, None]).all(-1)
        todo = todo[fits.sum(-1) > 1]
    solutions = nnf.one_hot(solutions, DIGITS).to(dtype).view(count, 4, 4, DIGITS)
    return solutions * keep.view(count, 4, 4, 1).to(dtype), solutions


def board_accuracy(pred: Tensor, solutions: Tensor) -> Tensor:
    """Fraction of boards whose every cell's argmax digit is right."""
    return (pred.argmax(-1) == solutions.argmax(-1)).flatten(1).all(-1).float().mean()


class SudokuDataModule(TensorDataModule):
    """Generated 4×4 puzzles and their solutions (no download), split at random.

    Args:
        n: number of puzzles; blanks: emptied cells per puzzle; unique: keep only puzzles
            with a unique completion; val_frac, test_frac: held-out fractions;
        batch_size, eval_batch_size, seed: see :class:`~experiments.tasks.data.TensorDataModule`.
    """

    def __init__(self, n: int = 1000, blanks: int = 8, unique: bool = True, val_frac: float = 0.1,
                 test_frac: float = 0.2, batch_size: int | None = 50,
                 eval_batch_size: int | None = None, seed: int = 0):
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, seed=seed)
        self.n, self.blanks, self.unique = n, blanks, unique
        self.fractions = (val_frac, test_frac)

    def make_splits(self):
        puzzles, solutions = make_sudoku(self.n, self.blanks, self.seed, self.unique)
        return tuple((puzzles[idx], solutions[idx])
                     for idx in split_indices(self.n, self.fractions, self.seed))


class OptNetSudoku(nn.Module):
    """One QP layer with learned equality constraints (OptNet's Sudoku model).

    Args:
        n_eq: number of learned equality constraints (the true rules: 64, of rank 40); with
            ``init="random"`` fewer than 64, else ``A z = A z₀`` pins ``z`` to ``z₀``.
        eps: the quadratic penalty ``ε`` that makes the QP strictly convex.
        solver: the QP layer's solver (default: :class:`implicit_layers.InteriorPoint`).
        init: ``"random"`` (uniform entries, as OptNet) or ``"true"`` (the true rules).
        seed: seeds the random initialization.

    >>> import torch
    >>> from experiments.tasks.sudoku import OptNetSudoku, board_accuracy, make_sudoku
    >>> puzzles, solutions = make_sudoku(4, blanks=8, seed=0)
    >>> model = OptNetSudoku(n_eq=64, init="true")
    >>> float(board_accuracy(model(puzzles), solutions))
    1.0
    """

    def __init__(self, n_eq: int = 40, eps: float = 0.1, solver=None, init: str = "random",
                 seed: int = 0):
        super().__init__()
        if init == "true":
            A = sudoku_constraints()
            if n_eq != len(A):
                raise ValueError(f"init='true' needs n_eq={len(A)}, got {n_eq}")
        elif init == "random":
            if not 0 < n_eq < CELLS * DIGITS:  # 64 independent rows would pin z to z₀
                raise ValueError(f"n_eq must lie in [1, {CELLS * DIGITS - 1}] for init='random', "
                                 f"got {n_eq}")
            A = torch.rand(n_eq, CELLS * DIGITS, generator=torch.Generator().manual_seed(seed))
        else:
            raise ValueError(f"init must be 'random' or 'true', got {init!r}")
        self.A = nn.Parameter(A)
        self.eps = eps
        self.qp = il.QPLayer(solver=solver)

    def forward(self, puzzles: Tensor) -> Tensor:
        p = puzzles.reshape(-1, CELLS * DIGITS).to(self.A.dtype)
        n = p.shape[-1]
        eye = torch.eye(n, dtype=p.dtype, device=p.device)
        b = self.A.sum(-1) / DIGITS  # A z₀ with z₀ = ¼·𝟙
        z, _lam, _mu = self.qp(self.eps * eye, -p, self.A, b, -eye, p.new_zeros(n))
        return z.reshape(puzzles.shape)


class SudokuQP(TaskModule):
    """:class:`OptNetSudoku` trained on the mean squared error to the solution.

    Logs ``{train,val,test}_loss``, ``{val,test}_board_acc`` (every cell right) and
    ``{val,test}_cell_acc`` (cells right, blanks and givens alike).

    Args:
        n_eq, eps, solver, init, init_seed: see :class:`OptNetSudoku` (``init_seed``: its seed).
        optimizer, scheduler, interval: see :class:`~experiments.tasks.module.TaskModule`.
    """

    def __init__(self, optimizer, n_eq: int = 40, eps: float = 0.1, solver=None,
                 init: str = "random", init_seed: int = 0, scheduler=None, interval: str = "epoch"):
        super().__init__(optimizer, scheduler, interval)
        self.net = OptNetSudoku(n_eq=n_eq, eps=eps, solver=solver, init=init, seed=init_seed)

    def forward(self, puzzles: Tensor) -> Tensor:
        return self.net(puzzles)

    def training_step(self, batch, _idx):
        puzzles, solutions = batch
        pred = self(puzzles)
        loss = nnf.mse_loss(pred, solutions.to(pred.dtype))
        self.log("train_loss", loss, prog_bar=True, batch_size=len(puzzles))
        return loss

    def validation_step(self, batch, _idx):
        self._evaluate(batch, "val")

    def test_step(self, batch, _idx):
        self._evaluate(batch, "test")

    def _evaluate(self, batch, split: str) -> None:
        puzzles, solutions = batch
        pred = self(puzzles)
        right = pred.argmax(-1) == solutions.argmax(-1)
        self.log_dict({f"{split}_loss": nnf.mse_loss(pred, solutions.to(pred.dtype)),
                       f"{split}_board_acc": board_accuracy(pred, solutions),
                       f"{split}_cell_acc": right.float().mean()},
                      prog_bar=split == "val", batch_size=len(puzzles))
