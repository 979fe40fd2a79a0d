"""The README's Python examples run, and CI runs the README's test command."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
EXAMPLES = re.findall(r"```python\n(.*?)```", README, flags=re.S)


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_readme_example_runs(index):
    exec(compile(EXAMPLES[index], f"README.md example {index}", "exec"), {})


def test_readme_has_examples():
    assert len(EXAMPLES) >= 3


def test_ci_runs_the_readme_test_command():
    quickstart = re.search(r"## Quickstart.*?```bash\n(.*?)```", README, flags=re.S).group(1)
    commands = [line for line in quickstart.splitlines() if line.strip()]
    assert len(commands) == 2, "the Quickstart is two commands"
    test_cmd = next(c for c in commands if "pytest" in c)
    assert "python -m experiments.train" in commands[0]
    ci = (ROOT / ".ci" / "run").read_text()
    # CI adds only pip's -q flag
    assert test_cmd.replace("pip install ", "pip install -q ") in ci
