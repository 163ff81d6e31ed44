"""Bad-input fixtures: the simulator stack's settings with a fresh audit schema (the bigger
corpus is a ``soak`` test, run by ``make soak``)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cbtctl.demo.run import stack_settings as with_simulator
from cbtstream.config import Settings
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
