"""The pieces of the lp_shortest_path experiment: PyEPO's data with our LP solutions, the
regret as PyEPO computes it, the baselines, the losses. (Training runs: test_runs/test_targets.)"""

import numpy as np
import pytest
import torch

import implicit_layers as il
from experiments.tasks.shortest_path import (
    DecisionFocusedShortestPath,
    ShortestPathDataModule,
    expected_costs,
    regret_sums,
    solve_lp,
    train_spo_plus,
)
from implicit_layers.testing.lp_problems import grid_arcs, grid_paths, shortest_path_lp
from tests.layers.qp_fixtures import one_thread  # noqa: F401 (autouse fixture)


@pytest.fixture(scope="module")
def data():
    dm = ShortestPathDataModule(n_train=120, n_val=10, n_test=60, seed=3)
    dm.setup()
    return dm


def test_arcs_and_constraints_are_pyepos_shortest_path():
    from pyepo.model.utils import _get_grid_arcs

    for grid in ((5, 5), (3, 4), (4, 2)):
        assert grid_arcs(*grid) == _get_grid_arcs(grid)
    A, b, G, h = shortest_path_lp((5, 5))
    assert A.shape == (24, 40) and int(torch.linalg.matrix_rank(A)) == 24
    full, _, _, _ = shortest_path_lp((5, 5), drop_redundant=False)
    assert int(torch.linalg.matrix_rank(full)) == 24  # the dropped row was redundant
    paths = grid_paths((5, 5))
    assert paths.shape == (70, 40)  # C(8, 4) monotone paths
    torch.testing.assert_close(paths @ A.T, b.expand(70, -1), rtol=0, atol=0)


def test_data_are_pyepos_with_optimal_paths_and_the_noise_free_costs(data):
    from pyepo.data.shortestpath import genData

    phi, c = genData(190, 5, (5, 5), deg=4, noise_width=0.5, seed=3)
    splits = [data.splits[k].tensors for k in ("train", "val", "test")]
    assert [len(s[0]) for s in splits] == [120, 10, 60]
    torch.testing.assert_close(torch.cat([s[1] for s in splits]), torch.as_tensor(c, dtype=torch.float64))
    torch.testing.assert_close(torch.cat([s[0] for s in splits]), torch.as_tensor(phi, dtype=torch.float64))
    # our LP solutions are the cheapest paths (brute force over all 70)
    _, costs, x, mean = splits[0]
    best = (costs @ grid_paths((5, 5)).T).min(-1).values
    torch.testing.assert_close((costs * x).sum(-1), best, atol=1e-7, rtol=0)
    # c = E[c | φ] · ε with ε uniform on [0.5, 1.5]: the reconstruction of E[c | φ] is right
    ratio = torch.cat([s[1] / s[3] for s in splits])
    assert float(ratio.min()) >= 0.5 - 1e-5 and float(ratio.max()) <= 1.5 + 1e-5
    assert abs(float(ratio.mean()) - 1) < 0.02
    assert np.allclose(expected_costs(phi[:2], 40, 4, 3), mean[:2].numpy())


def test_regret_is_pyepos_normalized_regret(data):
    from pyepo.data.dataset import optDataset
    from pyepo.metric import regret
    from pyepo.model.ort import shortestPathModel

    phi, c, x, _ = data.splits["test"].tensors
    predictor = torch.nn.Linear(5, 40)
    with torch.no_grad():
        c_hat = predictor(phi.float()).double()
    num, den = regret_sums(solve_lp(c_hat, data.lp), c, x)
    model = shortestPathModel((5, 5))
    loader = torch.utils.data.DataLoader(optDataset(model, phi.numpy(), c.numpy()), batch_size=32)
    assert num / den == pytest.approx(regret(predictor, model, loader), rel=1e-5)


def test_spo_plus_baseline_learns(data):
    phi, c, x, _ = data.splits["train"].tensors
    untrained = train_spo_plus(phi, c, x, (5, 5), epochs=0, lr=0.01, batch_size=32, seed=0)
    trained = train_spo_plus(phi, c, x, (5, 5), epochs=3, lr=0.05, batch_size=32, seed=0)

    def regret(model):
        with torch.no_grad():
            num, den = regret_sums(solve_lp(model(phi.float()).double(), data.lp), c, x)
        return num / den

    assert regret(trained) < 0.5 * regret(untrained)


@pytest.mark.parametrize("surrogate, loss", [
    (il.PerturbedLP(0.5, 4), "fenchel_young"),
    (il.PerturbedLP(0.5, 4), "decision"),
    (il.SmoothedLP(1.0), "decision"),
    (il.SmoothedLP(1.0), "fenchel_young"),
])
def test_each_surrogate_loss_reaches_the_predictor(data, surrogate, loss):
    model = DecisionFocusedShortestPath(torch.optim.Adam, surrogate, loss=loss)
    phi, c, x, _ = data.splits["train"].tensors
    model.surrogate_loss(phi[:16], c[:16], x[:16]).backward()
    grad = model.predict.weight.grad
    assert bool(torch.isfinite(grad).all()) and float(grad.abs().max()) > 0


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="loss must be one of"):
        DecisionFocusedShortestPath(torch.optim.Adam, il.PerturbedLP(), loss="mse")
    with pytest.raises(ValueError, match="needs a surrogate with a fenchel_young_loss"):
        DecisionFocusedShortestPath(torch.optim.Adam, torch.nn.Identity(), loss="fenchel_young")
    with pytest.raises(ValueError, match="n_train, n_val and n_test"):
        ShortestPathDataModule(n_val=0)
