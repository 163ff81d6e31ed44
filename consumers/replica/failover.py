"""The replica side of a failover: hand a VM's replicas to the operator, and take them back.

``cbtstream failover VM`` publishes a ``ReplicationHold(failed_over)`` (the planner plans
nothing for the VM's disks, ``streams/holds.py``), then marks each replica record of the VM on
this copier host failed over (:func:`hand_over`): under the replica's lock, so a sync that is
writing is waited for and none starts halfway. From then on the replica guard refuses every
plan for it (``replica_failed_over``), whoever produced it: a plan of the planner still in
flight, or one produced again by hand. The replica is the operator's: a VM may boot from it.

``failover --undo`` takes each replica back (:func:`take_back`): it is re-hashed and compared
with its record (``consumers/replica/verify.py``). Untouched, it returns to replication as it
was, and the next sync is incremental from the change ID it holds. Written while failed over
(a VM booted from it), or dirty or of unknown state, its record is marked ``mismatch`` with a
detail that says so, and the next sync copies it in full with reason ``replica_mismatch``.
Only then is the hold released.

No Kafka here: the command publishes the holds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from consumers.copy.digest import HashTree
from consumers.copy.digest_v1 import V1Tree
from consumers.replica.location import ReplicaLocation
from consumers.replica.state import ReplicaState, ReplicaStatus
from consumers.replica.store import ReplicaBusy
from consumers.replica.verify import Found, check_replica

#: The hashing of ``take_back``: the verifier's reader (file, block device or NBD).
ReadTarget = Callable[[ReplicaLocation, int, Callable[[int], None] | None, int],
                      Awaitable[HashTree | V1Tree]]


@dataclass(frozen=True)
class Handed:
    """What happened to one replica."""

    disk_key: str
    #: failed_over | already_failed_over | failed_back | resync | not_failed_over | busy |
    #: unknown; with ``failover --at`` (consumers/replica/rollback.py) also rolled_back |
    #: no_point | not_clean | mismatch | unsupported
    result: str
    detail: str
    change_id: str | None = None
    location: str = ""

    @property
    def ok(self) -> bool:
        return self.result not in ("busy", "unknown", "no_point", "not_clean", "mismatch",
                                   "unsupported")


def _held(record: ReplicaState) -> str | None:
    return record.held.change_id if record.held is not None else None


def unknown(found: Found) -> Handed:
    return Handed(found.disk_key, "unknown", "the replica's record cannot be read",
                  location=found.location.location)


def busy(found: Found, why: object, change_id: str | None = None) -> Handed:
    return Handed(found.disk_key, "busy", f"{why}; run the command again", change_id,
                  found.location.location)


async def hand_over(found: Found, reason: str, wait_s: float) -> Handed:
    """Mark one replica failed over, after any sync writing it has ended."""
    loc = found.location
    try:
        async with loc.store.lock(wait_s=wait_s):
            record = await asyncio.to_thread(loc.store.load)
            if not isinstance(record, ReplicaState):
                return unknown(found)
            if record.failed_over_at is not None:
                return Handed(found.disk_key, "already_failed_over",
                              f"since {record.failed_over_at.isoformat()}", _held(record),
                              loc.location)
            await asyncio.to_thread(loc.store.save, record.failed_over(reason))
    except ReplicaBusy as exc:
        return busy(found, exc)
    if record.status != ReplicaStatus.CLEAN:
        detail = (f"the replica is {record.status.value} (an interrupted sync or a verify "
                  "mismatch): it is not a consistent copy of any snapshot")
    else:
        snapshot = record.held.vm_snapshot if record.held is not None else "-"
        detail = f"holds {_held(record)} (snapshot {snapshot})"
    return Handed(found.disk_key, "failed_over", detail, _held(record), loc.location)


async def take_back(found: Found, read_target: ReadTarget, wait_s: float) -> Handed:
    """Return one failed-over replica to replication: as it is if its bytes still hash to its
    record, else marked for a full copy."""
    loc = found.location
    try:
        async with loc.store.lock(wait_s=wait_s):
            record = await asyncio.to_thread(loc.store.load)
        if not isinstance(record, ReplicaState):
            return unknown(found)
        if record.failed_over_at is None:
            return Handed(found.disk_key, "not_failed_over", "nothing to take back",
                          _held(record), loc.location)
        # Nothing writes a failed-over replica but the operator, so the check need not hold
        # the lock while it hashes (check_replica reads and marks under it).
        check = await check_replica(loc, read_target, mark=True, wait_s=wait_s)
        if check.result == "busy":
            return busy(found, check.detail, _held(record))
        async with loc.store.lock(wait_s=wait_s):
            now = await asyncio.to_thread(loc.store.load)
            if not isinstance(now, ReplicaState):
                return unknown(found)
            if check.ok:
                back, result = now.failed_back(), "failed_back"
                detail = f"unchanged: the next sync is incremental from {_held(now)}"
            else:
                why = ("written while failed over" if check.result == "mismatch"
                       else "not verifiable at failback")
                back = now.failed_back().mismatched(f"{why}: {check.detail}")
                result, detail = "resync", (f"{why} ({check.detail}): the next sync copies it "
                                            "in full (replica_mismatch)")
            await asyncio.to_thread(loc.store.save, back)
    except ReplicaBusy as exc:
        return busy(found, exc)
    return Handed(found.disk_key, result, detail, _held(now), loc.location)
