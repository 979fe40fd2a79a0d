"""``python -m experiments.bench``: fresh reports go to an ignored output directory, apart from
the reference results the README quotes; the usage message says what is optional."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from experiments.bench.__main__ import main
from tests.test_readme import ROOT

TINY = ["batch=2", "n=3", "iterations=[2]", "repeat=1"]


@pytest.fixture(autouse=True)
def keep_threads():  # the benchmark sets torch's thread count for itself
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_reports_go_to_outputs_bench_of_the_working_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    main(["rootfind", *TINY])
    record = json.loads((tmp_path / "outputs" / "bench" / "rootfind.json").read_text())
    assert record["settings"]["n"] == 3 and record["rows"]
    assert (tmp_path / "outputs" / "bench" / "rootfind.md").read_text().startswith("# Benchmark")
    main(["rootfind", *TINY, "--out", str(tmp_path / "elsewhere")])
    assert (tmp_path / "elsewhere" / "rootfind.json").exists()


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="not a git checkout")
def test_fresh_reports_in_the_repository_are_ignored_by_git_and_references_are_not():
    ignored = subprocess.run(["git", "check-ignore", "-q", "outputs/bench/rootfind.json"], cwd=ROOT)
    assert ignored.returncode == 0
    references = sorted((ROOT / "experiments" / "bench" / "reference").glob("*.md"))
    assert references
    tracked = subprocess.run(["git", "ls-files", "--error-unmatch", *map(str, references)],
                             cwd=ROOT, capture_output=True)
    assert tracked.returncode == 0


def test_usage_says_overrides_are_optional(capsys):
    with pytest.raises(SystemExit):
        main([])
    err = capsys.readouterr().err
    assert "required: name" in err and "overrides" not in err
    assert "[key=value ...]" in err
