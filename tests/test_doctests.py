"""The Examples sections of the public docstrings run and print what they show."""

import doctest
import importlib

import pytest

MODULES = ["sksae._sae", "sksae._dict_learning", "sksae.datasets", "sksae.metrics",
           "sksae.model_selection", "sksae._io", "sksae.activations._splice",
           "sksae.report", "sksae._refine"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0
