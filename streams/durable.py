"""The ``disks`` table, with row writes that can be awaited: a step's outputs are sent only once
the row they follow from is in the changelog.

Why: Faust sends a table write through its ``ProducerBuffer`` (a background task hands it to
aiokafka later), while ``Topic.send`` hands an output to aiokafka at once, so a step's outputs
usually reach the broker *before* its row. A worker killed in between leaves published outputs
over a row that never saw the input. The input is redelivered, but the planner's inputs come from
three topics and the next owner of the partition may read them in another order than the first
one did; re-processed against the older row, they then decide differently from the outputs
already published (the churn soak saw a ``SyncSuperseded`` for a snapshot that a later plan
copied and committed: a sync both superseded and committed). With the row acknowledged first
(``acks=-1``), a crash can lose only outputs of a row the changelog holds, and the redelivered
input republishes them (``streams.planner``, re-emission).

:class:`Outbox` keeps that order without holding up the agents: a step hands it its sends, and
they go out, in step order, as soon as the row of that step's disk is acknowledged; the agent
goes on with the next record meanwhile (awaiting each row in the agent instead cut the pipeline
bench from about 900 to about 260 disks/s; the outbox costs about 12 %). An offset commit
first drains the outbox (``streams.recovery.on_flush``), so a committed input always has its row
and its outputs in the log.

The override is one method, ``send_changelog``, which ``Table.on_key_set`` calls for every
``table[key] = value`` (both upstream sources are pinned with the other overrides in
``streams.recovery.UPSTREAM_SHA256``): it keeps the future of the latest write of each key until
the write is acknowledged.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import faust
from faust.types import FutureMessage

log = logging.getLogger("cbtstream.streams.durable")

#: Steps whose sends may wait in the outbox before the agents are held up (backpressure while
#: the broker does not acknowledge the rows).
OUTBOX_LIMIT = 2000

Send = Callable[[], Awaitable[Any]]


class DurableTable(faust.Table):  # type: ignore[type-arg]  # generic only for type checkers
    """A Faust table that knows each key's latest unacknowledged write (:meth:`pending`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: The latest unacknowledged changelog write of each key (removed once acknowledged).
        self._writes: dict[Any, FutureMessage] = {}

    def send_changelog(self, partition: int | None, key: Any, value: Any,
                       key_serializer: Any = None, value_serializer: Any = None) -> FutureMessage:
        fut = super().send_changelog(partition, key, value, key_serializer, value_serializer)
        self._writes[key] = fut

        def done(f: asyncio.Future[Any], key: Any = key) -> None:
            if self._writes.get(key) is f:
                del self._writes[key]

        fut.add_done_callback(done)
        return fut

    def pending(self, key: Any) -> FutureMessage | None:
        """The latest write of ``key`` not yet acknowledged, if any."""
        return self._writes.get(key)


class Outbox:
    """The sends of each step, made once the row of its disk is acknowledged, in step order.

    Each :meth:`put` chains one task on the one before: it waits for that task (so sends keep
    the order of the steps, hence of each partition's records), then for the row write the step
    made or left unacknowledged, then makes the step's sends (``Topic.send``: handed to the
    producer, whose flush before every commit awaits the acks). A failed row write fails every
    later entry too, and :meth:`drain`, so no offset is committed past it: the exception ends
    Faust's commit task, which crashes the worker (mode's ``Service.crash``), and the next
    owner processes the uncommitted inputs again.
    """

    def __init__(self, table: DurableTable, limit: int = OUTBOX_LIMIT) -> None:
        self._table = table
        self._tail: asyncio.Future[None] | None = None
        self._limit = limit
        self._pending = 0
        self._room = asyncio.Event()
        self._room.set()

    @property
    def pending(self) -> int:
        """Steps whose sends are not made yet."""
        return self._pending

    async def put(self, key: Any, sends: Sequence[Send]) -> None:
        """Queue ``sends``, to be made once ``key``'s latest row write is acknowledged."""
        while self._pending >= self._limit:
            self._room.clear()
            await self._room.wait()
        write = self._table.pending(key)
        if not sends:
            return
        self._pending += 1
        self._tail = asyncio.ensure_future(self._after(self._tail, write, sends))

    async def _after(self, before: asyncio.Future[None] | None, write: FutureMessage | None,
                     sends: Sequence[Send]) -> None:
        try:
            if before is not None:
                await asyncio.shield(before)  # its failure is this entry's too (logged once)
            if write is not None:
                try:
                    await asyncio.shield(write)
                except Exception:
                    log.error("row write failed: its outputs and every later one withheld",
                              exc_info=True)
                    raise
            for send in sends:
                await send()
        finally:
            self._pending -= 1
            if self._pending < self._limit:
                self._room.set()

    async def drain(self) -> None:
        """Return once every queued send was made (raises if a row write failed)."""
        tail = self._tail
        if tail is not None:
            await asyncio.shield(tail)
