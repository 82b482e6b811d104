"""Every docstring example of the package runs and prints what it says."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import qlis

# every module of the package (its __main__ runs the command line when imported)
MODULES = [m.name for m in pkgutil.walk_packages(qlis.__path__, "qlis.")
           if not m.name.endswith("__main__")]


@pytest.mark.parametrize("name", ["qlis", *MODULES])
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"


def test_the_core_has_examples():
    attempted = sum(
        doctest.testmod(importlib.import_module(name)).attempted for name in MODULES
    )
    assert attempted >= 60
