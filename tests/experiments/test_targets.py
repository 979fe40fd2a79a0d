"""Each experiment, run with its shipped config, reaches the targets in configs/experiment/."""

from __future__ import annotations

import json

import pytest

from experiments.summary import evaluate_targets, parse_target
from tests.experiments.conftest import needs_layer, run


@pytest.mark.parametrize("name", [
    pytest.param("deq_digits", marks=[needs_layer("deq_digits"), pytest.mark.slow]),
    pytest.param("lqr_lyapunov", marks=needs_layer("lqr_lyapunov")),
    pytest.param("qp_decision", marks=needs_layer("qp_decision")),
    pytest.param("rootfind_eos", marks=needs_layer("rootfind_eos")),
    pytest.param("qp_sudoku", marks=needs_layer("qp_sudoku")),
    pytest.param("lp_shortest_path", marks=[needs_layer("lp_shortest_path"), pytest.mark.slow]),
    pytest.param("hyperparam_ridge", marks=needs_layer("hyperparam_ridge")),
])
def test_experiment_reaches_its_targets(name, tmp_path):
    run(tmp_path, f"experiment={name}")
    record = json.loads((tmp_path / "summary.json").read_text())
    assert record["targets"], "the experiment declares targets"
    assert all(t["met"] for t in record["targets"].values()), record["targets"]
    if name == "qp_decision":
        assert record["metrics"]["two_stage_regret"] <= 0.01  # the baseline, for comparison
    if name == "lp_shortest_path":  # no predictor beats the oracle; ours beats the two-stage one
        m = record["metrics"]
        assert m["oracle_regret"] < m["test_regret"] < m["two_stage_regret"]
    if name == "hyperparam_ridge":  # learned per-feature penalties vs RidgeCV on the same rows
        assert record["metrics"]["test_loss"] <= record["metrics"]["ridgecv_test_loss"]
        assert record["metrics"]["penalty_noise_median"] > record["metrics"]["penalty_real_median"]


def test_targets_are_evaluated_and_bad_specs_rejected():
    result = evaluate_targets({"acc": 0.98, "err": 0.1}, {"acc": ">= 0.97", "err": "<= 1e-3",
                                                          "missing": "< 1"})
    assert [result[k]["met"] for k in ("acc", "err", "missing")] == [True, False, False]
    assert parse_target("<=1e-3") == ("<=", 1e-3)
    with pytest.raises(ValueError, match="must look like"):
        parse_target("about 0.9")
    with pytest.raises(ValueError, match="must look like"):
        parse_target("<= two words")


def test_a_target_can_be_another_metric_of_the_run():
    assert parse_target("<= ridgecv_test_loss") == ("<=", "ridgecv_test_loss")
    result = evaluate_targets({"loss": 0.5, "baseline": 0.6, "worse": 0.4},
                              {"loss": "<= baseline", "baseline": "<= worse", "worse": "< missing"})
    assert [result[k]["met"] for k in ("loss", "baseline", "worse")] == [True, False, False]
    assert result["loss"]["bound"] == 0.6
