"""A clean install: the wheel holds the library only (no top-level ``experiments``), ships
``py.typed`` and the license, and the README's library examples run from it outside the
repository; ``implicit_layers.__version__`` is the installed metadata version."""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import implicit_layers as il
from implicit_layers._version import package_version
from tests.test_readme import EXAMPLES, ROOT

VERSION = re.search(r'^version = "(.+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)


def test_version_is_the_installed_metadata_version():
    assert il.__version__ == importlib.metadata.version("implicit_layers")


def test_version_of_a_source_checkout_comes_from_pyproject():
    assert package_version("no-such-distribution") == VERSION


def run(*cmd, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kwargs)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.slow
def test_wheel_installs_the_library_only_and_runs_the_readme_examples_elsewhere(tmp_path):
    # build from a copy of what the wheel is made of: the checkout stays untouched
    src = tmp_path / "src"
    shutil.copytree(ROOT / "implicit_layers", src / "implicit_layers",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
        "--no-index", "-w", tmp_path / "dist", src)
    (wheel,) = (tmp_path / "dist").glob("implicit_layers-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"implicit_layers", f"implicit_layers-{VERSION}.dist-info"}
    assert "implicit_layers/py.typed" in names
    assert f"implicit_layers-{VERSION}.dist-info/licenses/LICENSE" in names

    # a fresh virtualenv that sees the installed torch & co., the wheel installed into it
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv)
    python = venv / "bin" / "python"
    run(sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-index", wheel)
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))").stdout.strip())
    assert (site / "implicit_layers").is_dir() and not (site / "experiments").exists()

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = elsewhere / "readme_examples.py"
    script.write_text(
        "import implicit_layers, torch\n"
        "print(implicit_layers.__file__, implicit_layers.__version__)\n"
        f"for code in {EXAMPLES!r}:\n"
        "    exec(compile(code, 'README example', 'exec'), {})\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = run(python, script.name, cwd=elsewhere, env=env).stdout
    location, version = out.splitlines()[0].rsplit(" ", 1)
    assert Path(location).is_relative_to(site) and version == VERSION
