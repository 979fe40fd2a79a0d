"""The package's version: the installed distribution's metadata (what ``pip`` installed), or
``pyproject.toml``'s in a source checkout that was never installed."""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def package_version(distribution: str = "implicit_layers") -> str:
    """The installed version of ``distribution``; else the version in the ``pyproject.toml``
    beside this package; else ``"0+unknown"``.

    >>> import implicit_layers
    >>> package_version() == implicit_layers.__version__
    True
    """
    try:
        return version(distribution)
    except PackageNotFoundError:
        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        text = pyproject.read_text() if pyproject.is_file() else ""
        found = re.search(r'^version\s*=\s*"([^"]+)"', text, flags=re.MULTILINE)
        return found.group(1) if found else "0+unknown"


__version__ = package_version()
