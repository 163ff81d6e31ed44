"""The issue-13 reproducer against the real broker: planner workers restarted over and over
(SIGTERM and SIGKILL mixed, overlapping, no readiness waits) while snapshots flow; see
``tests/rebalance/churn.py`` for what is checked. ``test_churn_short`` runs in ``make test``;
``test_churn_soak`` (50 restarts at 75 snapshots/s) in ``make soak``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cbtctl.bench.pipeline import delete_topics
from cbtstream.config import Settings
from cbtstream.kafka import create_topics
from tests.rebalance.churn import Churn, run
from tests.support import isolated_settings

pytestmark = pytest.mark.integration


async def _churn(base: Settings, tmp: Path, churn: Churn) -> None:
    settings = isolated_settings(base, tmp, kafka={"partitions": 6},
                                 streams={"remove_snapshots": False})
    # CHURN_LOG_LEVEL=INFO keeps every planner output in the worker logs (for a diagnosis)
    settings = settings.model_copy(
        update={"log_level": os.environ.get("CHURN_LOG_LEVEL", "WARNING")})
    await create_topics(settings.kafka)
    try:
        figures = await run(settings, tmp, churn)
    finally:
        await delete_topics(settings)
    print("figures:", figures.summary())
    assert figures.problems() == [], "\n".join([figures.summary(), *figures.problems()])


@pytest.mark.timeout(300)
async def test_churn_short(stack_settings: Settings, tmp_path: Path) -> None:
    """3 workers, 10 restarts about every 4 s, 40 snapshots/s over 60 disks."""
    await _churn(stack_settings, tmp_path, Churn(restarts=10, interval_s=4.0, rate=40.0))


@pytest.mark.soak
@pytest.mark.timeout(1800)
async def test_churn_soak(stack_settings: Settings, tmp_path: Path) -> None:
    """3 workers, 50 restarts about every 8 s (about 7 minutes), 75 snapshots/s over 200
    disks."""
    await _churn(stack_settings, tmp_path, Churn(restarts=50, interval_s=8.0, rate=75.0,
                                                 disks=200, drain_timeout_s=180.0))
