"""The pieces of the OptNet Sudoku experiment: valid, uniquely solvable puzzles; a QP model that
solves them given the true rules; clear errors. (Training runs are in test_runs/test_targets.)"""

import pytest
import torch

from experiments.tasks.sudoku import (
    OptNetSudoku,
    SudokuDataModule,
    all_boards,
    board_accuracy,
    make_sudoku,
    sudoku_constraints,
)
from tests.layers.qp_fixtures import one_thread  # noqa: F401 (autouse fixture)


def is_valid(board: torch.Tensor) -> bool:
    groups = [*board, *board.T] + [board[i:i + 2, j:j + 2].flatten() for i in (0, 2) for j in (0, 2)]
    return all(sorted(g.tolist()) == [0, 1, 2, 3] for g in groups)


def completions(puzzle: torch.Tensor) -> int:
    """How many valid boards complete the puzzle, by backtracking over its blank cells."""
    grid = [[int(d) if float(v) > 0 else None for d, v in zip(row.argmax(-1), row.sum(-1))]
            for row in puzzle]
    blank = next(((r, c) for r in range(4) for c in range(4) if grid[r][c] is None), None)
    if blank is None:
        return 1
    r, c = blank
    r0, c0 = r // 2 * 2, c // 2 * 2  # the box's corner
    seen = {*grid[r], *(grid[i][c] for i in range(4)),
            *(grid[i][j] for i in (r0, r0 + 1) for j in (c0, c0 + 1))}
    count = 0
    for d in set(range(4)) - seen:
        filled = puzzle.clone()
        filled[r, c, d] = 1
        count += completions(filled)
    return count


def test_all_288_boards_are_distinct_and_valid():
    boards = all_boards()
    assert boards.shape == (288, 4, 4)  # the known count of 4×4 Sudoku grids
    assert len({tuple(b.flatten().tolist()) for b in boards}) == 288
    assert all(is_valid(b) for b in boards)


def test_the_true_rules_hold_exactly_on_every_board():
    A = sudoku_constraints()
    z = torch.nn.functional.one_hot(all_boards().flatten(1), 4).flatten(1).float()
    torch.testing.assert_close(z @ A.T, torch.ones(288, len(A)), rtol=0, atol=0)
    assert int(torch.linalg.matrix_rank(A)) == 40
    wrong = z.clone().view(288, 16, 4)[:, [1, 0, *range(2, 16)]]  # swap two cells of a row
    assert bool(((wrong.flatten(1) @ A.T) != 1).any(-1).all())


def test_puzzles_have_the_blanks_asked_for_and_a_unique_completion():
    puzzles, solutions = make_sudoku(40, blanks=10, seed=3)
    assert all(is_valid(s) for s in solutions.argmax(-1))
    assert bool((puzzles.sum((-1, -2, -3)) == 6).all())  # 16 cells − 10 blanks
    assert bool((puzzles <= solutions).all())
    assert [completions(p) for p in puzzles] == [1] * 40
    assert len({tuple(s.argmax(-1).flatten().tolist()) for s in solutions}) > 20  # varied boards
    # without the uniqueness filter, 10 blanks often leave several completions
    loose, _ = make_sudoku(40, blanks=10, seed=3, unique=False)
    assert max(completions(p) for p in loose) > 1


def test_data_module_splits_are_seeded_and_disjoint_draws():
    dm = SudokuDataModule(n=100, batch_size=10, seed=1)
    dm.setup()
    sizes = {k: len(v) for k, v in dm.splits.items()}
    assert sizes == {"train": 70, "val": 10, "test": 20}
    again = SudokuDataModule(n=100, batch_size=10, seed=1)
    again.setup()
    torch.testing.assert_close(dm.splits["test"].tensors[0], again.splits["test"].tensors[0])
    puzzles, solutions = next(iter(dm.train_dataloader()))
    assert puzzles.shape == solutions.shape == (10, 4, 4, 4)


@pytest.mark.parametrize("blanks", [8, 12])
def test_the_qp_with_the_true_rules_solves_the_puzzles(blanks):
    puzzles, solutions = make_sudoku(30, blanks=blanks, seed=5, dtype=torch.float64)
    model = OptNetSudoku(n_eq=64, init="true").double()
    pred = model(puzzles)
    assert float(board_accuracy(pred, solutions)) == 1.0
    assert bool((pred >= -1e-8).all())
    torch.testing.assert_close(pred.sum(-1), torch.ones(30, 4, 4, dtype=torch.float64))
    assert float(board_accuracy(OptNetSudoku(n_eq=40).double()(puzzles), solutions)) < 0.5


def test_gradients_reach_the_learned_constraints():
    puzzles, solutions = make_sudoku(6, seed=2, dtype=torch.float64)
    model = OptNetSudoku(n_eq=40, seed=1).double()
    torch.nn.functional.mse_loss(model(puzzles), solutions).backward()
    assert model.A.grad.shape == (40, 64)
    assert bool(torch.isfinite(model.A.grad).all()) and float(model.A.grad.abs().max()) > 0
    assert bool(model.qp.stats.forward.converged.all())


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="blanks must lie in"):
        make_sudoku(2, blanks=17)
    with pytest.raises(ValueError, match="init must be"):
        OptNetSudoku(init="zeros")
    with pytest.raises(ValueError, match="init='true' needs n_eq=64"):
        OptNetSudoku(n_eq=40, init="true")
    with pytest.raises(ValueError, match="n_eq must lie in"):
        OptNetSudoku(n_eq=64)
