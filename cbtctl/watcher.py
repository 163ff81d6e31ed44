"""Follows the pipeline's output topics for one VM, without joining any consumer group (so it
never takes work from the pipeline), and lets a driver wait for each disk's outcome."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer

from cbtstream.config import Settings
from cbtstream.kafka import client_kwargs, topic_name, topic_partitions
from schemas.codec import EventDecodeError, decode
from schemas.events import (
    ChangeIdCommitted,
    SnapshotRemoved,
    SyncFailed,
    SyncPlanned,
    SyncProgress,
    SyncSuperseded,
)
from schemas.topics import (
    CHANGEID_COMMITTED,
    SNAPSHOT_REMOVED,
    SYNC_FAILED,
    SYNC_PLANNED,
    SYNC_PROGRESS,
)

Outcome = ChangeIdCommitted | SyncFailed | SyncSuperseded
Watched = SyncPlanned | SyncSuperseded | ChangeIdCommitted | SyncFailed | SyncProgress | \
    SnapshotRemoved


class Watcher:
    """Collects the events of one VM from the moment :meth:`start` returns."""

    def __init__(self, settings: Settings, vm_instance_uuid: str) -> None:
        self.settings = settings
        self.vm = vm_instance_uuid
        self.events: list[Watched] = []
        self._changed = asyncio.Condition()
        self._consumer = AIOKafkaConsumer(**client_kwargs(settings.kafka), group_id=None,
                                          enable_auto_commit=False)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._consumer.start()
        tps = []
        for spec in (SYNC_PLANNED, CHANGEID_COMMITTED, SYNC_FAILED, SYNC_PROGRESS,
                     SNAPSHOT_REMOVED):
            tps += await topic_partitions(self._consumer, topic_name(spec, self.settings.kafka))
        self._consumer.assign(tps)
        await self._consumer.seek_to_end()
        for tp in tps:  # resolve the end offsets now, so nothing published later is skipped
            await self._consumer.position(tp)
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._consumer.stop()

    async def _run(self) -> None:
        while True:
            batch = await self._consumer.getmany(timeout_ms=200)
            got = False
            for records in batch.values():
                for r in records:
                    try:
                        ev = decode(r.value, key=r.key)
                    except EventDecodeError:
                        continue
                    if ev.disk.vm_instance_uuid == self.vm:
                        self.events.append(ev)  # type: ignore[arg-type]
                        got = True
            if got:
                async with self._changed:
                    self._changed.notify_all()

    def outcomes(self, vm_snapshot: str) -> dict[int, Outcome]:
        """Per device key, how the disk finished with ``vm_snapshot`` (latest event wins)."""
        out: dict[int, Outcome] = {}
        for ev in self.events:
            if isinstance(ev, Outcome) and ev.vm_snapshot == vm_snapshot:
                out[ev.disk.device_key] = ev
        return out

    def plans(self, vm_snapshot: str) -> dict[int, SyncPlanned]:
        return {ev.disk.device_key: ev for ev in self.events
                if isinstance(ev, SyncPlanned) and ev.vm_snapshot == vm_snapshot}

    def removed(self, vm_snapshot: str) -> set[int]:
        return {ev.disk.device_key for ev in self.events
                if isinstance(ev, SnapshotRemoved) and ev.vm_snapshot == vm_snapshot}

    async def wait_for(self, done: Callable[[], bool], timeout_s: float,
                       on_change: Callable[[], None] | None = None,
                       alive: Callable[[], None] | None = None) -> None:
        """Wait until ``done()``; ``alive()`` may raise to abort (a pipeline process died)."""
        deadline = time.monotonic() + timeout_s
        while not done():
            if alive is not None:
                alive()
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the pipeline did not finish in time")
            async with self._changed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), min(left, 1.0))
            if on_change is not None:
                on_change()

    def latest_progress(self, sync_ids: dict[int, str]) -> dict[int, SyncProgress]:
        out: dict[int, SyncProgress] = {}
        for ev in self.events:
            if isinstance(ev, SyncProgress) and str(ev.sync_id) == sync_ids.get(
                    ev.disk.device_key):
                out[ev.disk.device_key] = ev
        return out
