"""Per-disk status from a replay of the log: no dependency on a running worker. Pure.

A disk's running sync (the planner's) is shown by what its copier last said of it:
``queued`` (held by a copier, not started; with its place in the copier's queue), ``running``
(copying), ``silent`` (nothing heard, neither report nor plan nor re-issue, for longer than a
healthy copier stays quiet: the planner will re-issue it and then time it out) or ``planned``
(no report yet, not silent yet), or ``waiting_for_pool`` (no report and its pool has no live
copier: it waits for one, and the worker does not time it out; ``streams/pools.py``).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from cbtctl.replay.lineage import DiskLineage


@dataclass(frozen=True)
class Running:
    """A sync that is planned and has no outcome in the log yet."""

    sync_id: uuid.UUID
    vm_snapshot: str
    replication_type: str
    planned_at: datetime
    bytes_done: int | None = None
    bytes_total: int | None = None
    rate_bytes_per_s: float | None = None
    progress_at: datetime | None = None
    #: What the latest report said: "queued" (held, not started), "running", or None (none).
    reported: str | None = None
    queue_position: int | None = None
    #: Nothing heard of it (report, plan, re-issue) for longer than a healthy copier is quiet.
    silent: bool = False
    #: The copier pool of its plan.
    pool: str = "default"
    #: With a queued report: what it waits for (a copy slot, its ESXi host's limit...).
    wait_reason: str | None = None
    #: Its pool has no live copier (the consumer group has no member).
    pool_unserved: bool = False

    @property
    def state(self) -> str:
        if self.pool_unserved and self.reported is None:
            return "waiting_for_pool"
        if self.silent:
            return "silent"
        return self.reported or "planned"

    @property
    def percent(self) -> float | None:
        if self.bytes_done is None or not self.bytes_total:
            return None
        return 100.0 * self.bytes_done / self.bytes_total


@dataclass(frozen=True)
class Failure:
    reason: str
    detail: str
    at: datetime


@dataclass(frozen=True)
class DiskStatus:
    key: str
    vm_instance_uuid: str
    vm_name: str
    disk_id: str
    change_id: str | None
    last_sync_at: datetime | None
    last_type: str | None
    last_reason: str | None
    commits: int
    running: Running | None
    failure: Failure | None
    waiting: str | None
    #: Who copies the disk: "cbtstream", or "external" (a copier storing its change IDs through
    #: the API).
    owner: str = "cbtstream"
    #: Why the VM's latest snapshot did not capture the disk (``DiskSkipped.reason``), if so.
    skipped: str | None = None
    #: The copier pool holding its replica (that of its latest plan).
    pool: str = "default"

    @property
    def state(self) -> str:
        if self.running is not None:
            return self.running.state
        if self.skipped is not None:
            return "skipped"
        if self.failure is not None:
            return "failed"
        return "synced" if self.change_id is not None else "new"


def disk_status(lin: DiskLineage, now: datetime | None = None,
                silent_after: timedelta | None = None,
                unserved: frozenset[str] = frozenset()) -> DiskStatus:
    """The disk's latest applied commit, its running sync (with the latest report of that sync)
    and its last failure if nothing was committed since. With ``now`` and ``silent_after``, a
    running sync heard of longer ago than that is silent; one of a pool in ``unserved`` (no
    live copier) that no copier reported waits for its pool."""
    last = lin.links[-1] if lin.links else None
    row = lin.state
    running = None
    if row is not None and row.running is not None:
        r = row.running
        prog = lin.progress.get(r.sync_id)
        heard = max(t for t in (r.planned_at, row.reissued_at, prog[1] if prog else None)
                    if t is not None)
        silent = now is not None and silent_after is not None and now - heard > silent_after
        waits = r.pool in unserved
        if prog is None:
            running = Running(r.sync_id, r.vm_snapshot, str(r.replication_type), r.planned_at,
                              silent=silent and not waits, pool=r.pool, pool_unserved=waits)
        else:
            p, at = prog
            queued = p.state == "queued"
            running = Running(
                r.sync_id, r.vm_snapshot, str(r.replication_type), r.planned_at,
                None if queued else p.bytes_done, None if queued else p.bytes_total,
                None if queued else p.rate_bytes_per_s, at, reported=p.state,
                queue_position=p.queue_position, silent=silent, pool=r.pool,
                wait_reason=p.wait_reason, pool_unserved=waits)
    failure = None
    if lin.last_failed is not None and running is None:
        ev, _, at = lin.last_failed
        if last is None or at >= last.time:
            failure = Failure(ev.reason, ev.detail, at)
    return DiskStatus(
        key=lin.key, vm_instance_uuid=lin.disk.vm_instance_uuid, vm_name=lin.disk.vm_name,
        disk_id=lin.disk.disk_id,
        change_id=last.commit.change_id if last else (row.change_id if row else None),
        last_sync_at=last.time if last else None,
        last_type=str(last.commit.replication_type) if last else None,
        last_reason=str(last.commit.reason) if last else None,
        commits=len(lin.links), running=running, failure=failure,
        waiting=row.waiting.vm_snapshot if row is not None and row.waiting is not None else None,
        owner=row.owner if row is not None else "cbtstream",
        skipped=str(lin.skipped.reason) if lin.skipped is not None else None,
        pool=row.pool if row is not None and row.pool is not None else "default",
    )
