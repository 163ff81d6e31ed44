"""Re-reads source partitions that Faust stopped delivering after a rebalance.

faust-streaming 0.15.3 resumes fetching a newly assigned partition before it seeks to the
committed offset and before flow control is resumed (``Recovery.on_recovery_completed``). A record
fetched in that window can be dropped by flow control while the consumer's read position moves
past it: the record is never processed and never committed, and the partition looks idle until
the next rebalance. We saw exactly that in the end-to-end tests after a worker restart (a disk's
snapshot never planned).

The watchdog checks each assigned source partition every ``INTERVAL_S``: if the log has records
beyond the committed offset, no message of that partition is in flight, and the committed offset
has not moved for ``STALL_CHECKS`` checks in a row, it seeks the partition back to its committed
offset. Re-delivery is harmless: the planner drops redelivered snapshots and commits by event id.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from streams.app import Planner

log = logging.getLogger("cbtstream.streams.watchdog")

#: Seconds between checks.
INTERVAL_S = 10.0
#: Consecutive idle checks with pending records before the partition is re-read (so a partition
#: is re-read after 20-30 s without progress; a busy partition commits every few seconds).
STALL_CHECKS = 2


def stalled(committed: int | None, highwater: int | None, in_flight: bool,
            previous: int | None) -> bool:
    """One check of one partition: records wait, nothing is in flight, no progress since the
    previous check. Pure."""
    return (
        committed is not None
        and highwater is not None
        and highwater > committed
        and not in_flight
        and previous == committed
    )


def register_watchdog(planner: Planner, source_topics: set[str]) -> None:
    """Start the watchdog timer in the planner's Faust app."""
    app = planner.app
    last: dict[Any, int | None] = {}
    strikes: defaultdict[Any, int] = defaultdict(int)

    @app.timer(interval=INTERVAL_S, name="cbtstream-partition-watchdog")  # type: ignore[untyped-decorator]
    async def watchdog() -> None:
        consumer = app.consumer
        busy = {m.tp for m in consumer.unacked}
        for tp in consumer.assignment():
            if tp.topic not in source_topics:
                continue
            committed = consumer._committed_offset.get(tp)  # type: ignore[attr-defined]
            try:
                highwater = consumer.highwater(tp)
            except Exception:  # no fetch yet for this partition: nothing to judge
                continue
            if stalled(committed, highwater, tp in busy, last.get(tp)):
                strikes[tp] += 1
            else:
                strikes[tp] = 0
            last[tp] = committed
            if strikes[tp] >= STALL_CHECKS and committed is not None:
                log.warning("source partition stalled with records pending; re-reading it "
                            "from its committed offset",
                            extra={"topic": tp.topic, "partition": tp.partition,
                                   "committed": committed, "highwater": highwater})
                await consumer.seek(tp, committed)
                strikes[tp] = 0
