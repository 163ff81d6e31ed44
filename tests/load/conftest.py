"""The ``soak`` marker for the long load run (``make soak``; skipped otherwise)."""

from __future__ import annotations

from pathlib import Path

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "soak: long runs (make soak)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "soak" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="soak test: run with `make soak` (pytest -m soak)")
    here = Path(__file__).parent
    for item in items:
        if item.get_closest_marker("soak") is not None and here in Path(item.path).parents:
            item.add_marker(skip)
