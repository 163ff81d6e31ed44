"""Shared fixtures. Integration tests use the local stack started by ``cbtstream stack up``
(``make test`` starts it); each test gets its own topic prefix, so tests never see each other's
events."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cbtstream.config import Settings, load_settings
from cbtstream.kafka import create_topics
from tests.support import isolated_settings, kafka_answers


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``soak`` tests (long crash, fault, bad-input and load runs) only run with ``-m soak``
    (``make soak``)."""
    if "soak" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="soak test: run with `make soak` (pytest -m soak)")
    for item in items:
        if item.get_closest_marker("soak") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def stack_settings() -> Settings:
    """Settings of the running dev stack (env vars may point elsewhere)."""
    return load_settings()


@pytest.fixture
async def kafka_settings(stack_settings: Settings, tmp_path: Path) -> AsyncIterator[Settings]:
    """Isolated settings on the real broker, with every topic created."""
    if not await kafka_answers(stack_settings):
        pytest.fail(
            f"Kafka does not answer at {stack_settings.kafka.bootstrap_servers}: "
            "run `cbtstream stack up` (make test does)"
        )
    settings = isolated_settings(stack_settings, tmp_path)
    await create_topics(settings.kafka)
    yield settings
