"""The order in which the replay feeds one disk's records to the planner.

The live planner consumes ``cbt.snapshot.taken``, ``cbt.changeid.committed`` and
``cbt.sync.failed`` concurrently, and its outputs land on other topics; Kafka only orders records
within one partition of one topic. All records of one disk are in the same partition of each
topic (they are keyed by disk key), so the replay merges the disk's per-topic sequences (each in
offset order) by record timestamp. Timestamps are the producers' clocks (``CreateTime``): they
order records that are seconds apart, but records produced in the same millisecond, or on hosts
whose clocks disagree, can come out of the merge before what caused them. Causality is therefore
restored explicitly: before a record is used, the records it depends on (its snapshot, its plan,
the end of the sync running before it) are pulled forward from later in the merge. The rules of
what depends on what live in :mod:`cbtctl.replay.lineage`; this module only provides the queue.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable

from cbtctl.replay.records import LogRecord

#: Tie-break for equal timestamps: inputs before the outputs that react to them (a snapshot
#: before its plan, a commit or failure before the plan of the snapshot that waited for it).
TOPIC_RANK: dict[str, int] = {
    "cbt.snapshot.taken": 0,
    "cbt.changeid.committed": 1,
    "cbt.sync.failed": 2,
    "cbt.sync.planned": 3,
    "cbt.sync.progress": 4,
    "cbt.snapshot.removed": 5,
}


def merge_key(rec: LogRecord) -> tuple[int, int, str, int, int]:
    return (rec.timestamp_ms, TOPIC_RANK.get(rec.topic_name, 9), rec.coord.topic,
            rec.coord.partition, rec.coord.offset)


class CausalQueue:
    """One disk's records merged by timestamp, from which a record can be taken out of turn."""

    def __init__(self, records: Iterable[LogRecord]) -> None:
        self._pending: deque[LogRecord] = deque(sorted(records, key=merge_key))

    def __bool__(self) -> bool:
        return bool(self._pending)

    def __len__(self) -> int:
        return len(self._pending)

    def pop(self) -> LogRecord:
        return self._pending.popleft()

    def push_front(self, rec: LogRecord) -> None:
        self._pending.appendleft(rec)

    def take(self, match: Callable[[LogRecord], bool]) -> LogRecord | None:
        """Remove and return the first pending record that matches, if any."""
        for i, rec in enumerate(self._pending):
            if match(rec):
                del self._pending[i]
                return rec
        return None

    def next(self, prerequisites: Callable[[LogRecord], list[Callable[[LogRecord], bool]]]
             ) -> LogRecord:
        """The next record to use: the head of the merge, unless one of its prerequisites is
        still pending, in which case that prerequisite is moved in front of it (and checked for
        its own prerequisites). The number of moves is bounded, so this always terminates even
        if the rules were ever cyclic."""
        moves = len(self._pending)
        rec = self.pop()
        while moves > 0:
            found = None
            for match in prerequisites(rec):
                found = self.take(match)
                if found is not None:
                    break
            if found is None:
                return rec
            self.push_front(rec)
            rec = found
            moves -= 1
        return rec
