"""The copier's queued reports (``consumers/queued.py``, pure): how often, and what they say."""

from __future__ import annotations

from cbtstream.config import CopierSettings, Settings, StreamsSettings
from consumers.queued import queued_reports, report_interval
from tests.copier.fakes import plan


def _settings(interval: float, timeout: float) -> Settings:
    return Settings(copier=CopierSettings(queue_report_interval_s=interval),
                    streams=StreamsSettings(sync_timeout_s=timeout))


def test_the_interval_stays_well_under_the_silent_sync_timeout() -> None:
    assert report_interval(_settings(60, 1800)) == 60
    assert report_interval(_settings(60, 10)) == 2  # a fifth of the time-out at most
    assert report_interval(_settings(60, 0)) == 60  # time-out off


def test_reports_number_the_waiting_plans_once_each_and_skip_running_syncs() -> None:
    a, b, c = plan(1), plan(2), plan(3)
    reports = queued_reports([b, a, b, c], active=[a])
    assert [(r.sync_id, r.state, r.queue_position) for r in reports] == [
        (b.sync_id, "queued", 1), (c.sync_id, "queued", 2)]
    assert all(r.bytes_done == 0 and r.disk == p.disk for r, p in zip(reports, (b, c),
                                                                        strict=True))
