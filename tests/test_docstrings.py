"""Every ``>>>`` example in the package's docstrings runs and prints what it shows."""

import doctest
import importlib
import pkgutil

import pytest

import implicit_layers

MODULES = sorted(
    m.name for m in pkgutil.walk_packages(implicit_layers.__path__, prefix="implicit_layers.")
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"


def test_every_public_class_has_an_example():
    missing = [
        name for name in implicit_layers.__all__
        if isinstance(getattr(implicit_layers, name), type)
        and not issubclass(getattr(implicit_layers, name), Exception | Warning)
        and ">>>" not in (getattr(implicit_layers, name).__doc__ or "")
    ]
    assert not missing, f"public classes without a runnable example: {missing}"
