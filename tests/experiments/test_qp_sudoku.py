"""The reusable pieces of the OptNet Sudoku experiment: valid data, and a model that learns."""

import torch

from experiments.tasks.sudoku import OptNetSudoku, board_accuracy, make_sudoku, train_sudoku
from tests.layers.qp_fixtures import one_thread  # noqa: F401 (autouse fixture)


def test_generated_boards_are_valid_sudokus_and_puzzles_have_blanks():
    puzzles, solutions = make_sudoku(20, blanks=6, seed=3)
    digits = solutions.argmax(-1)
    for b in digits:
        groups = [*b, *b.T] + [b[i:i + 2, j:j + 2].flatten() for i in (0, 2) for j in (0, 2)]
        assert all(sorted(g.tolist()) == [0, 1, 2, 3] for g in groups)
    assert bool((puzzles.sum(-1).sum((-1, -2)) == 10).all())  # 16 cells − 6 blanks
    assert bool((puzzles <= solutions).all())
    assert len({tuple(d.flatten().tolist()) for d in digits}) > 10  # varied boards


def test_optnet_sudoku_learns():
    train, test = make_sudoku(100, seed=1), make_sudoku(50, seed=2)
    model = OptNetSudoku(n_eq=40, seed=0)
    mse = lambda: float(torch.nn.functional.mse_loss(model(test[0]), test[1]))  # noqa: E731
    with torch.no_grad():
        before = mse()
    out = train_sudoku(model, train, test, epochs=2, batch_size=50, lr=0.3)
    losses = out["losses"]
    assert losses[-1] < 0.92 * losses[0]
    with torch.no_grad():
        assert mse() < 0.92 * before  # it generalizes, not only fits the batches it saw
        assert board_accuracy(model(test[0]), test[1]) == out["test_board_acc"]
    assert 0.0 <= out["test_board_acc"] <= 1.0
