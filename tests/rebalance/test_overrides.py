"""The Faust overrides of ``streams.recovery``, pinned, and the silent-sync scan. No broker."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import faust

from streams.recovery import (
    UPSTREAM_SHA256,
    SeekFirstRecovery,
    TableManager,
    install_full_flush,
    upstream_digests,
)
from streams.timeouts import silent


def test_upstream_faust_methods_are_the_ones_the_overrides_were_written_against() -> None:
    """A faust-streaming upgrade that changes any of these fails here: re-read the new source,
    re-check ``streams/recovery.py`` (is the bug still there? does the override still match the
    surrounding code?), then update ``UPSTREAM_SHA256``."""
    assert upstream_digests() == UPSTREAM_SHA256


def test_app_uses_the_seek_first_recovery() -> None:
    app = faust.App("t-recovery", broker="kafka://127.0.0.1:1", store="memory://",
                    TableManager=TableManager, autodiscover=False)
    assert isinstance(app.tables.recovery, SeekFirstRecovery)


def test_full_flush_is_installed() -> None:
    from faust.transport.producer import ProducerBuffer

    install_full_flush()
    assert ProducerBuffer.flush.__name__ == "_full_flush"


def test_silent_scan_reads_only_running_rows_past_the_timeout() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    sid = uuid.uuid4()
    row = {"running": {"sync_id": str(sid), "planned_at": (now - timedelta(minutes=31)).isoformat(),
                       "disk": {"vm_instance_uuid": "u", "device_key": 2000}},
           "reissued_at": None}
    check = silent(row, now, timedelta(minutes=30), {})
    assert check is not None and check.sync_id == sid and check.disk_key == "u/disk-2000"
    assert silent(row, now, timedelta(minutes=30), {sid: now - timedelta(minutes=1)}) is None
    assert silent({"running": None}, now, timedelta(minutes=30), {}) is None
    row["reissued_at"] = (now - timedelta(minutes=5)).isoformat()
    assert silent(row, now, timedelta(minutes=30), {}) is None


async def test_changelog_seeks_read_unknown_or_negative_offsets_as_the_start() -> None:
    """The soak's worker crash: a changelog offset of None reached aiokafka's seek."""
    from collections import Counter

    from streams.recovery import SeekFirstRecovery

    class FakeConsumer:
        seeks: dict[str, int] = {}

        async def seek_wait(self, offsets: dict[str, int]) -> None:
            self.seeks = offsets

    consumer = FakeConsumer()
    offsets: Counter[str] = Counter({"a": -1, "b": 41, "c": -7})
    offsets["d"] = None  # type: ignore[assignment]
    await SeekFirstRecovery._seek_offsets(None, consumer, {"a", "b", "c", "d"},  # type: ignore[arg-type]
                                          offsets, "active")
    assert consumer.seeks == {"a": 0, "b": 41, "c": 0, "d": 0}
