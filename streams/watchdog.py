"""Re-reads source partitions that Faust stopped delivering (a safety net).

faust-streaming 0.15.3 could drop records right after an assignment (resume before seek, stale
read offsets); ``streams.recovery`` fixes that at its root, and the rebalance soak
(``tests/rebalance``) asserts the watchdog never acts with the fix in. It stays as a net for the
same family of Faust bugs we have not found yet (a stalled partition would otherwise wait for
the next rebalance): it is cheap (one timer, no I/O but a seek when it acts), and every action is
a warning log line and ``cbtstream_watchdog_actions_total``.

The watchdog checks each assigned source partition every ``INTERVAL_S``: if the log has records
beyond the committed offset, no message of that partition is in flight, and the committed offset
has not moved for ``STALL_CHECKS`` checks in a row, it seeks the partition back to its committed
offset. Re-delivery is harmless: the planner drops redelivered snapshots and commits by event id.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import faust

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


def register_watchdog(app: faust.App, source_topics: set[str],
                      on_action: Callable[[str], None]) -> None:
    """Start the watchdog timer in ``app`` for ``source_topics``; ``on_action(topic)`` is called
    for every re-read (the metric)."""
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
                on_action(tp.topic)
                strikes[tp] = 0
