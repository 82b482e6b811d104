"""The examples in the core modules' docstrings run and print what they say."""

from __future__ import annotations

import doctest
import importlib

import pytest

CORE_MODULES = [
    "qlis",
    "qlis.stats",
    "qlis.select",
    "qlis.tensors",
    "qlis.prune",
    "qlis.quantize",
    "qlis.policy",
    "qlis.compress",
    "qlis.registry",
    "qlis.strategy",
]


@pytest.mark.parametrize("name", CORE_MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"


def test_the_core_has_examples():
    attempted = sum(
        doctest.testmod(importlib.import_module(name)).attempted for name in CORE_MODULES
    )
    assert attempted >= 15
