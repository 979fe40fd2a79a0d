"""``python -m experiments.bench qp`` with small settings: every case and peer runs, and every
row carries its accuracy against the references (which are themselves checked)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from experiments.bench.__main__ import main

# qpth is a peer only where it is installed (its pins clash with numpy 2: not in the dev extra)
QPTH = ["qpth"] if importlib.util.find_spec("qpth") is not None else []
TWO_SIDED = ["ours", "ours_stacked", "proxsuite_default", *QPTH]
MAIN = ["ours", "ours_primal", *QPTH, "proxsuite_default", "cvxpylayers_tight_dense_1core"]
SMALL = ["rounds=1", "large_batch_rounds=1", "main.batch_sizes=[2,3]", "main.n=8", "main.m=6",
         "main.p=2",
         f"main.methods=[{','.join(MAIN)}]",
         "main.large_batch_methods=[ours,proxsuite_omp_parallel]", "small.batch_size=2",
         "small.sizes=[10]", "two_sided.batch_size=2", "two_sided.n=10", "two_sided.m=6",
         "two_sided.p=2", f"two_sided.methods=[{','.join(TWO_SIDED)}]"]


@pytest.fixture(autouse=True)
def keep_threads():  # the benchmark sets torch's thread count for itself
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_every_case_reports_times_ratios_and_accuracy(tmp_path):
    main(["qp", *SMALL, "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "qp.json").read_text())["rows"]
    by_case: dict[str, dict[str, dict]] = {}
    for row in rows:
        by_case.setdefault(row["case"], {})[row["method"]] = row
    assert list(by_case) == ["B=2 n=8 m=6 p=2 f64", "B=3 n=8 m=6 p=2 f64",
                             "small B=2 n=10 m=10 p=2 f64", "two-sided B=2 n=10 m=6 p=2 f64"]
    assert set(by_case["B=3 n=8 m=6 p=2 f64"]) == {"ours", "proxsuite_omp_parallel"}
    assert set(by_case["two-sided B=2 n=10 m=6 p=2 f64"]) == set(TWO_SIDED)
    for case in by_case.values():
        for method, row in case.items():
            assert row["forward_s"] > 0 and row["fwd_bwd_s"] > 0
            assert row["reference_x_err"] < 1e-8 and row["reference_fd_rel_err"] < 1e-5
            if method.startswith(("ours", "qpth", "proxsuite")):  # solved to ≥ 1e-9 tolerances
                assert row["x_err"] < 1e-6 and row["c_grad_err_rel"] < 1e-4, (method, row)
            expected = None if method == "ours" else case["ours"]["fwd_bwd_s"] / row["fwd_bwd_s"]
            assert row["fwd_bwd_ratio_ours/theirs"] == pytest.approx(expected)


def test_unknown_cases_and_methods_are_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown qp benchmark cases"):
        main(["qp", "cases=[tiny]", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="unknown qp benchmark method 'proxsuite_fast'"):
        main(["qp", "cases=[small]", "small.sizes=[5]", "small.methods=[ours,proxsuite_fast]",
              "--out", str(tmp_path)])
