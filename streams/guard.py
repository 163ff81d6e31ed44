"""The commit guard: which ``ChangeIdCommitted`` may become a disk's latest change ID.

A commit is applied only if it continues the disk's lineage exactly:

* its record key names the disk of its body (checked when the record is decoded);
* it belongs to the sync that is running for that disk, on the same disk identity;
* its ``previous_change_id`` equals the disk's current change ID (``None`` only for a disk that
  never committed, and then only for a full sync);
* its ``change_id`` is the one the plan promised (the snapshot's), and an incremental commit stays
  in the previous change ID's epoch with a larger sequence.

A redelivered commit (same event id, or same sync and change ID as the applied one) is a harmless
duplicate, and so is a commit of a sync the row remembers as finished (``DiskState.ended``:
committed, failed or timed out) with the lineage its plan promised: its outcome is already
decided. The same sync committing another lineage is a real conflict and refused. Everything
else is refused and reported as ``SyncFailed(reason="lineage_mismatch")``.
Replay tools apply this same function to the log to tell applied commits from refused ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from schemas.changeid import ChangeId
from schemas.events import ChangeIdCommitted, ReplicationType
from streams.state import DiskState


class Verdict(StrEnum):
    ACCEPT = "accept"
    DUPLICATE = "duplicate"
    REFUSE = "refuse"


@dataclass(frozen=True)
class GuardResult:
    verdict: Verdict
    detail: str = ""


def check_commit(state: DiskState | None, ev: ChangeIdCommitted) -> GuardResult:
    """Decide whether ``ev`` may be applied to the disk whose current row is ``state``."""
    if state is not None and (
        state.commit_event_id == ev.event_id
        or (state.commit_sync_id == ev.sync_id and state.change_id == ev.change_id)
    ):
        return GuardResult(Verdict.DUPLICATE, "already applied")
    running = state.running if state is not None else None
    if state is not None and (running is None or running.sync_id != ev.sync_id):
        ended = state.ended_sync(ev.sync_id)
        if ended is not None:
            if (ended.previous_change_id, ended.change_id) == (ev.previous_change_id,
                                                               ev.change_id):
                return GuardResult(Verdict.DUPLICATE, f"sync already {ended.outcome}")
            return GuardResult(Verdict.REFUSE, f"sync {ev.sync_id} already {ended.outcome}; "
                               "this commit names another lineage than its plan")
    if running is None or running.sync_id != ev.sync_id:
        return GuardResult(Verdict.REFUSE, f"sync {ev.sync_id} is not the running sync of the disk")
    if running.disk != ev.disk:
        return GuardResult(Verdict.REFUSE, "commit names a different disk identity than its plan")
    current = state.change_id if state is not None else None
    if ev.previous_change_id != current:
        return GuardResult(
            Verdict.REFUSE,
            f"previous change ID {ev.previous_change_id!r} is not the disk's current {current!r}",
        )
    if current is None and ev.replication_type != ReplicationType.FULL:
        return GuardResult(Verdict.REFUSE, "first commit of a disk must come from a full sync")
    if ev.change_id != running.change_id:
        return GuardResult(
            Verdict.REFUSE,
            f"change ID {ev.change_id!r} is not the planned snapshot's {running.change_id!r}",
        )
    if (
        running.replication_type == ReplicationType.FULL
        and ev.replication_type != ReplicationType.FULL
    ):
        # The copier may fall back from incremental to full (vSphere rejected the base change
        # ID), never the other way round.
        return GuardResult(Verdict.REFUSE, "a planned full sync cannot commit as incremental")
    if ev.replication_type == ReplicationType.INCREMENTAL and current is not None:
        prev, new = ChangeId.parse(current), ChangeId.parse(ev.change_id)
        if not prev.same_epoch(new) or new.sequence <= prev.sequence:
            return GuardResult(Verdict.REFUSE, "incremental commit does not advance the epoch")
    return GuardResult(Verdict.ACCEPT)
