"""Bad-input fixtures: the simulator stack's settings with a fresh audit schema, and the
``soak`` marker for the bigger corpus (``pytest -m soak tests/badinput``; skipped otherwise)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cbtstream.config import Settings
from cbtstream.demo.run import stack_settings as with_simulator
from consumers.audit.repository import AuditRepository, AuditUnavailable


@pytest.fixture
async def badinput_settings(kafka_settings: Settings, stack_settings: Settings,
                            tmp_path: Path) -> AsyncIterator[Settings]:
    """Settings for worker, vSphere copier and audit consumer on an isolated prefix, with their
    own audit schema (dropped afterwards)."""
    schema = f"audit_bad{uuid.uuid4().hex[:10]}"
    probe = AuditRepository(stack_settings.postgres, schema=schema, timeout_s=3)
    try:
        await probe.start()
    except AuditUnavailable as exc:
        pytest.fail(f"PostgreSQL does not answer: {exc}; run `cbtstream stack up`")
    s = stack_settings_for(kafka_settings, tmp_path, schema)
    try:
        yield s
    finally:
        await probe.reset_schema(replace=True)
        await probe.stop()


def stack_settings_for(kafka_settings: Settings, tmp_path: Path, schema: str) -> Settings:
    s = with_simulator(kafka_settings)
    copier = s.copier.model_copy(update={"state_dir": tmp_path / "copier"})
    pg = s.postgres.model_copy(update={"db_schema": schema})
    return s.model_copy(update={"copier": copier, "postgres": pg})


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
