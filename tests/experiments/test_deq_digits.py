"""deq_digits options: warm starts keyed by sample index, fixed-point correction, and the
per-epoch logs (cell evaluations of the forward solves, spectral radius)."""

from __future__ import annotations

import csv

import pytest
import torch

from experiments.tasks.digits import DEQClassifier, WarmStarts
from tests.experiments.conftest import needs_layer, run


def test_warm_starts_return_the_stored_equilibrium_or_zeros():
    cache = WarmStarts()
    like = torch.zeros(3, 2)
    assert torch.equal(cache.get(torch.tensor([0, 1, 2]), like), like)  # nothing stored yet
    cache.put(torch.tensor([4, 1]), torch.tensor([[4.0, 4.0], [1.0, 1.0]]))
    got = cache.get(torch.tensor([1, 2, 7]), like)  # 2: not seen, 7: beyond the buffer
    assert got.tolist() == [[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]
    assert "z" not in cache.state_dict()  # not checkpointed: a start, not a parameter


def test_warm_started_training_step_solves_from_the_previous_equilibrium():
    model = DEQClassifier(torch.optim.Adam, width=16, warm_start=True)
    x, y, idx = torch.randn(5, 64), torch.randint(0, 10, (5,)), torch.arange(5)
    model.log = model.log_dict = lambda *a, **k: None  # outside a Trainer
    model.training_step((x, y, idx), 0)
    cold = model.deq.stats.forward.iterations.clone()
    model.recurrent.eval()  # the same map for the second solve (σ estimate frozen)
    model.training_step((x, y, idx), 1)
    assert int(cold.min()) > 0 and int(model.deq.stats.forward.iterations.max()) == 0


@pytest.mark.parametrize("options", [["model.warm_start=true"], ["model.correction=3"]])
@needs_layer("deq_digits")
def test_options_train_and_log_evaluations_and_spectral_radius(options, tmp_path):
    run(tmp_path, "experiment=deq_digits", "trainer.max_epochs=2", "data.batch_size=128",
        "trainer.limit_train_batches=2", "test=false",
        *options)
    rows = list(csv.DictReader(open(tmp_path / "csv" / "metrics.csv")))
    evals = [float(r["train_forward_evaluations"]) for r in rows
             if r.get("train_forward_evaluations")]
    radius = [float(r["spectral_radius"]) for r in rows if r.get("spectral_radius")]
    assert len(evals) == 2 and all(e > 0 for e in evals)
    assert len(radius) == 2 and all(0 < r < 0.9 + 1e-3 for r in radius)  # c = 0.9


def test_bad_correction_settings_are_rejected():
    with pytest.raises(ValueError, match="correction"):
        DEQClassifier(torch.optim.Adam, correction=0)
    with pytest.raises(ValueError, match="correction_gamma"):
        DEQClassifier(torch.optim.Adam, correction=2, correction_gamma=0.0)
