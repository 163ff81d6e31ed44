"""A pure, in-memory history of the pipeline for replay unit tests: the planner's own functions
decide, and every event becomes a LogRecord with coordinates and a timestamp, as on the broker."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from cbtctl.replay.records import Coord, LogRecord
from schemas.disk import DiskRef
from schemas.events import ChangeIdCommitted, DiskEvent, SnapshotTaken, SyncPlanned
from schemas.topics import topic_for
from streams import planner
from streams.state import DiskState
from tests.unit.factories import T0, commit_for, snap


@dataclass
class History:
    """Appends events to per-topic partition 0 logs with increasing timestamps."""

    records: list[LogRecord] = field(default_factory=list)
    offsets: dict[str, int] = field(default_factory=dict)
    rows: dict[str, DiskState | None] = field(default_factory=dict)
    clock: datetime = T0
    minutes: int = 0
    #: The configured pool the planner gives a disk at its first plan.
    pool: str = "default"

    def tick(self, ms: int = 5) -> datetime:
        self.clock += timedelta(milliseconds=ms)
        return self.clock

    def append(self, ev: DiskEvent, *, at: datetime | None = None) -> LogRecord:
        name = topic_for(ev).name
        off = self.offsets.get(name, 0)
        self.offsets[name] = off + 1
        t = at or self.tick()
        rec = LogRecord(Coord(name, 0, off), name, int(t.timestamp() * 1000), ev.disk.key, ev)
        self.records.append(rec)
        return rec

    def snapshot(self, d: DiskRef, change_id: str) -> SyncPlanned | None:
        """A snapshot, then the planner's reaction (published) — returns the plan if any."""
        self.minutes += 1
        s: SnapshotTaken = snap(d, change_id, minutes=self.minutes,
                                snapshot=f"snapshot-{self.minutes}")
        self.append(s)
        step = planner.snapshot_step(self.rows.get(d.key), s, self.tick(), pool=self.pool)
        row, out = step.state, step.outputs
        self.rows[d.key] = row
        plan = None
        for o in out:
            self.append(o)
            if isinstance(o, SyncPlanned):
                plan = o
        return plan

    def commit(self, ev: ChangeIdCommitted) -> list[SyncPlanned]:
        """A commit from the copier, then the planner's reaction (published)."""
        self.append(ev)
        row, out = planner.on_commit(self.rows.get(ev.disk.key), ev, self.tick())
        self.rows[ev.disk.key] = row
        for o in out:
            self.append(o)
        return [o for o in out if isinstance(o, SyncPlanned)]

    def cycle(self, d: DiskRef, change_id: str, **overrides: object) -> ChangeIdCommitted:
        plan = self.snapshot(d, change_id)
        assert plan is not None
        c = commit_for(plan, **overrides)
        self.commit(c)
        return c
