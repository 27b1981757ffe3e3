"""sam3_runner's public names: those it imports on first use (PEP 562) are as visible as the others."""

from __future__ import annotations

import sam3_runner


def test_dir_lists_the_names_loaded_on_first_use():
    """dir() (IDE completion, inspect.getmembers, pydoc's listing) lists every name of __all__, as it did when the
    package imported its engine and loader eagerly (0c69425); a module __getattr__ needs a __dir__ beside it."""
    assert sorted(set(sam3_runner.__all__) - set(dir(sam3_runner))) == []
