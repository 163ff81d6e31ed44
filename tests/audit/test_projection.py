"""The audit projection of ``SyncProgress`` (pure: statements, no database): a queued report
(``state="queued"``) is news of the sync but not progress of its copy."""

from __future__ import annotations

from datetime import timedelta

from consumers.audit.projection import newest_progress_only, project
from schemas.events import SyncProgress
from tests.unit.factories import T0, disk, new_id


def _progress(sync_id: object, minutes: int, **fields: object) -> SyncProgress:
    return SyncProgress(disk=disk(), sync_id=sync_id, occurred_at=T0 + timedelta(minutes=minutes),
                        **{"bytes_done": 0, "bytes_total": 0, "rate_bytes_per_s": 0.0,
                           **fields})  # type: ignore[arg-type]


def test_a_queued_report_touches_the_job_but_is_not_progress() -> None:
    sync = new_id()
    queued = project(_progress(sync, 0, state="queued", queue_position=3))
    running = project(_progress(sync, 1, bytes_done=5, bytes_total=10))
    assert not any("progress_at" in s.sql for s in queued)  # the job stays 'planned'
    assert {s.sql for s in queued} < {s.sql for s in running}
    assert any("progress_at" in s.sql for s in running)


def test_a_queued_report_never_hides_a_running_one_in_a_batch() -> None:
    sync = new_id()
    running = _progress(sync, 0, bytes_done=5, bytes_total=10)
    later_running = _progress(sync, 1, bytes_done=6, bytes_total=10)
    queued = _progress(sync, 2, state="queued", queue_position=1)  # a late, stale report
    kept = newest_progress_only([running, later_running, queued])
    assert kept == [later_running, queued]
