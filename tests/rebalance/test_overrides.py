"""The Faust overrides of ``streams.recovery``, pinned, the outbox of ``streams.durable``, and the
silent-sync scan. No broker."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import faust
import pytest

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


class _Writes:
    """Stands in for ``DurableTable.pending``: the unacknowledged write of each key."""

    def __init__(self) -> None:
        self.futures: dict[str, asyncio.Future[None]] = {}

    def write(self, key: str) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.futures[key] = fut
        return fut

    def pending(self, key: str) -> asyncio.Future[None] | None:
        fut = self.futures.get(key)
        return fut if fut is not None and not fut.done() else None


def _sender(sent: list[str], name: str) -> Callable[[], Awaitable[None]]:
    async def send() -> None:
        sent.append(name)
    return send


async def _settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


async def test_outbox_sends_a_step_only_after_its_row_and_in_step_order() -> None:
    from streams.durable import Outbox

    writes, sent = _Writes(), []
    outbox = Outbox(writes)  # type: ignore[arg-type]
    row_a = writes.write("a")
    await outbox.put("a", [_sender(sent, "plan-a"), _sender(sent, "notice-a")])
    await outbox.put("b", [_sender(sent, "plan-b")])  # b's row is acknowledged already
    await _settle()
    assert sent == []  # b waits behind a: sends keep the order of the steps
    drained = asyncio.ensure_future(outbox.drain())
    await _settle()
    assert not drained.done()  # no offset commit while a step's row is unacknowledged
    row_a.set_result(None)
    await drained
    assert sent == ["plan-a", "notice-a", "plan-b"]
    assert outbox.pending == 0


async def test_outbox_withholds_every_later_send_when_a_row_write_fails() -> None:
    from streams.durable import Outbox

    writes, sent = _Writes(), []
    outbox = Outbox(writes)  # type: ignore[arg-type]
    row = writes.write("a")
    await outbox.put("a", [_sender(sent, "plan-a")])
    await outbox.put("b", [_sender(sent, "plan-b")])
    row.set_exception(RuntimeError("changelog write failed"))
    with pytest.raises(RuntimeError, match="changelog write failed"):
        await outbox.drain()  # the commit fails: the inputs are processed again
    assert sent == []


async def test_outbox_holds_the_agent_when_full() -> None:
    from streams.durable import Outbox

    writes, sent = _Writes(), []
    outbox = Outbox(writes, limit=2)  # type: ignore[arg-type]
    row = writes.write("a")
    await outbox.put("a", [_sender(sent, "1")])
    await outbox.put("a", [_sender(sent, "2")])
    third = asyncio.ensure_future(outbox.put("a", [_sender(sent, "3")]))
    await _settle()
    assert not third.done()  # backpressure: the agent waits for room
    row.set_result(None)
    await third
    await outbox.drain()
    assert sent == ["1", "2", "3"]


async def test_commit_guard_never_commits_past_the_last_processed_record(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Faust acked an event whose processing a stop interrupted and committed past it (the e2e
    cycles test then found a disk stuck on a commit nobody applied): the guard caps each
    offset at one past the last record processed, drops partitions with nothing processed or
    nothing new, and leaves partitions it does not track to Faust."""
    from faust.types import TP

    from streams import recovery

    committed: list[dict[TP, int]] = []

    async def original(self: object, offsets: dict[TP, int], start: bool = True) -> bool:
        committed.append(dict(offsets))
        return True

    monkeypatch.setattr(recovery, "_ORIGINAL_COMMIT_OFFSETS", original)

    class App:
        pass

    class FakeConsumer:
        def __init__(self, app: App) -> None:
            self.app = app
            self._committed_offset = {TP("src", 3): 7}

    app = App()
    marks = {("src", 0): 2, ("src", 3): 6}  # last processed offsets

    def limit(topic: str, partition: int) -> int | None:
        if topic != "src":
            return None
        mark = marks.get((topic, partition))
        return -1 if mark is None else mark + 1

    recovery.limit_commits(app, limit)
    consumer = FakeConsumer(app)
    ok = await recovery._guarded_commit_offsets(consumer, {  # type: ignore[arg-type]
        TP("src", 0): 4,   # one record acked but never processed: held at 3
        TP("src", 1): 9,   # nothing processed since the assignment: not committed
        TP("src", 3): 9,   # capped at 7, which is committed already: nothing new
        TP("internal", 0): 5,  # another agent's partition: as Faust decided
    })
    assert ok and committed == [{TP("src", 0): 3, TP("internal", 0): 5}]
    committed.clear()
    assert not await recovery._guarded_commit_offsets(  # type: ignore[arg-type]
        consumer, {TP("src", 1): 2})
    assert committed == []
