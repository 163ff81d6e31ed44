"""Commits stored by external copiers (the seed's migratekit forks) through the change-ID API.

The seed's store call (``POST /api/v1/replications/{job_id}/changeid``) went wrong twice: a
missing ``disk_id`` defaulted to ``disk-2000`` and an unknown one was written to the VM's first
disk. Here the rules are (pure; the HTTP glue is ``streams.api``, the table agent applies the
commit through :func:`check_external`):

* **Which disk.** By disk key (the per-disk variant), or the VM by ``vm_path`` (body or query)
  or by a job id cbtstream knows (a sync id of one of its disks, or the last external job id it
  recorded), then the disk by ``disk_id``. A multi-disk VM without ``disk_id`` is 409 with its
  disk ids; an unknown VM or disk is 404. Never a default disk.
* **Which commit.** ``previous_change_id`` must equal the disk's current committed change ID
  (empty only for a disk with none); the new change ID must continue the lineage (same CBT epoch,
  larger sequence) unless the request declares a full copy (``replication_type: "full"``, or a
  disk's first commit). Anything else is 409 with the current change ID.
* **Who owns the disk.** A disk with an accepted external commit is owned by the external
  copier: cbtstream's planner does not plan it (so two copiers never race on one replica) until
  an operator hands it back (``streams.handover``, per disk key or VM uuid); disks listed in
  ``streams.external`` are left to their external copier from their first snapshot on. A
  handed-over disk, or one cbtstream is syncing right now, refuses external commits (409).
* **Idempotent.** The commit's ids derive from (disk, job id, previous, new change ID): the same
  store call again is recognised as applied and answered the same, with no second event.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from schemas.changeid import ChangeId
from schemas.events import (
    ChangeIdCommitted,
    FullReason,
    ReplicationType,
    SnapshotTaken,
    stable_event_id,
)
from streams.api import Answer, error
from streams.guard import GuardResult, Verdict
from streams.planner import Step, lineage_refusal, superseded_event
from streams.state import DiskState, Ended

STORED = "ChangeID stored successfully"
EXTERNAL: Final = "external"


@dataclass(frozen=True)
class StoreRequest:
    """One store call, from either endpoint, after its body was validated."""

    job_id: str
    change_id: str
    previous_change_id: str | None
    replication_type: str | None = None
    disk_id: str | None = None
    vm_path: str | None = None
    disk_key: str | None = None
    client: str | None = None
    bytes_copied: int = 0


def _listed(state: DiskState, keys: Sequence[str]) -> bool:
    return state.disk.key in keys or state.disk.vm_instance_uuid in {k.lower() for k in keys}


@dataclass(frozen=True)
class Ownership:
    """The operator's word on who copies which disks (``streams.external``,
    ``streams.handover``: disk keys or VM instance uuids)."""

    #: Copied by an external copier from the start: never planned by cbtstream.
    external: tuple[str, ...] = ()
    #: Handed to cbtstream's copier: planned by cbtstream, external commits refused.
    handover: tuple[str, ...] = ()

    def handed_over(self, state: DiskState) -> bool:
        return _listed(state, self.handover)

    def owned_externally(self, state: DiskState | None) -> bool:
        """Whether cbtstream's planner must leave this disk to its external copier."""
        return (state is not None and (state.owner == EXTERNAL or _listed(state, self.external))
                and not self.handed_over(state))


# -- which disk -------------------------------------------------------------------------------
def known_job(row: DiskState, job_id: str) -> bool:
    ids = {str(row.commit_sync_id)} if row.commit_sync_id else set()
    if row.running is not None:
        ids.add(str(row.running.sync_id))
    if row.external_job_id:
        ids.add(row.external_job_id)
    return job_id in ids


def locate(rows: Iterable[DiskState], req: StoreRequest) -> DiskState | Answer:
    """The row the store call is about, or the 4xx answer that says why there is none."""
    rows = list(rows)
    if req.disk_key is not None:
        row = next((r for r in rows if r.disk.key == req.disk_key), None)
        return row if row is not None else error(404, "Disk not found",
                                                  f"no disk {req.disk_key} in the table")
    by_vm: dict[str, list[DiskState]] = {}
    if req.vm_path:
        for r in rows:
            if r.disk.vm_path == req.vm_path:
                by_vm.setdefault(r.disk.vm_instance_uuid, []).append(r)
    else:
        vms = {r.disk.vm_instance_uuid for r in rows if known_job(r, req.job_id)}
        for r in rows:
            if r.disk.vm_instance_uuid in vms:
                by_vm.setdefault(r.disk.vm_instance_uuid, []).append(r)
    if not by_vm:
        what = f"vm_path {req.vm_path!r}" if req.vm_path else f"job {req.job_id!r}"
        return error(404, "VM not found",
                      f"no VM known by {what}; pass vm_path (in the body or the query)")
    if len(by_vm) > 1:
        return error(409, "Ambiguous VM", "several VMs match; ask by disk key",
                      vm_instance_uuids=sorted(by_vm))
    disks = sorted(next(iter(by_vm.values())), key=lambda r: r.disk.device_key)
    ids = [d.disk.disk_id for d in disks]
    if not req.disk_id:
        if len(disks) > 1:
            return error(409, "Multi-disk VM: disk_id is required",
                          "this VM has several disks, each with its own change ID; there is "
                          "no default disk", disk_ids=ids)
        return disks[0]
    row = next((d for d in disks if d.disk.disk_id == req.disk_id), None)
    if row is None:
        return error(404, "Disk not found",
                      f"the VM has no disk {req.disk_id!r}; nothing was stored", disk_ids=ids)
    return row


# -- which commit -----------------------------------------------------------------------------
def commit_for(row: DiskState, req: StoreRequest, now: datetime) -> ChangeIdCommitted:
    """The commit event of a store call (ids derived from the call: idempotent)."""
    full = req.replication_type == "full" or row.change_id is None
    key = row.disk.key
    sync_id = stable_event_id("external-sync", key, req.job_id, req.change_id)
    reason = (FullReason.NO_PREVIOUS_COMMIT if row.change_id is None
              else FullReason.EXTERNAL_FULL_COPY if full else FullReason.PREVIOUS_COMMIT)
    return ChangeIdCommitted(
        event_id=stable_event_id("ChangeIdCommitted", EXTERNAL, key, req.job_id,
                                 req.previous_change_id or "", req.change_id),
        occurred_at=now,
        disk=row.disk,
        sync_id=sync_id,
        vm_snapshot=EXTERNAL,
        previous_change_id=req.previous_change_id,
        change_id=req.change_id,
        replication_type=ReplicationType.FULL if full else ReplicationType.INCREMENTAL,
        reason=reason,
        bytes_copied=req.bytes_copied,
        extents=0,
        digest="external:unverified",
        duration_s=0.0,
        origin=EXTERNAL,
        origin_job_id=req.job_id[:256],
        origin_client=(req.client or "")[:256] or None,
    )


def check_external(state: DiskState | None, ev: ChangeIdCommitted,
                   ownership: Ownership) -> GuardResult:
    """May the table apply an external commit? The rules of the module docstring."""
    if state is None:
        return GuardResult(Verdict.REFUSE, "unknown disk")
    if state.commit_event_id == ev.event_id or (
            state.commit_sync_id == ev.sync_id and state.change_id == ev.change_id):
        return GuardResult(Verdict.DUPLICATE, "already applied")
    if ownership.handed_over(state):
        return GuardResult(Verdict.REFUSE, "the disk was handed over to cbtstream's copier")
    if state.running is not None:
        return GuardResult(Verdict.REFUSE, f"cbtstream is syncing this disk "
                           f"(sync {state.running.sync_id})")
    if ev.disk.key != state.disk.key:
        return GuardResult(Verdict.REFUSE, "commit names another disk")
    if ev.previous_change_id != state.change_id:
        return GuardResult(Verdict.REFUSE, f"previous change ID {ev.previous_change_id!r} is "
                           f"not the disk's current {state.change_id!r}")
    if ev.replication_type == ReplicationType.INCREMENTAL and state.change_id is not None:
        prev, new = ChangeId.parse(state.change_id), ChangeId.parse(ev.change_id)
        if not prev.same_epoch(new) or new.sequence <= prev.sequence:
            return GuardResult(Verdict.REFUSE, "the change ID does not continue the disk's "
                               "lineage (another CBT epoch or no larger sequence); declare "
                               "replication_type 'full' after a full copy")
    return GuardResult(Verdict.ACCEPT)


def store(rows: Iterable[DiskState], req: StoreRequest, now: datetime,
          ownership: Ownership) -> tuple[Answer, ChangeIdCommitted | None]:
    """The answer to a store call and the commit to publish (None: nothing to publish)."""
    found = locate(rows, req)
    if isinstance(found, Answer):
        return found, None
    ev = commit_for(found, req, now)
    verdict = check_external(found, ev, ownership)
    if verdict.verdict == Verdict.REFUSE:
        return error(409, "Change ID not stored", verdict.detail,
                      disk_id=found.disk.disk_id, current_change_id=found.change_id or ""), None
    answer = stored_answer(req, found, ev)
    return answer, (None if verdict.verdict == Verdict.DUPLICATE else ev)


def stored_answer(req: StoreRequest, row: DiskState, ev: ChangeIdCommitted) -> Answer:
    """The seed's success body, plus the disk key and commit id."""
    return Answer(200, {"job_id": req.job_id, "disk_id": row.disk.disk_id,
                        "change_id": ev.change_id, "message": STORED,
                        "disk_key": row.disk.key, "commit_event_id": str(ev.event_id)})


# -- the table's side ----------------------------------------------------------------------------
def apply_external(state: DiskState | None, ev: ChangeIdCommitted, now: datetime,
                   ownership: Ownership) -> Step:
    """The commit agent's step for an external commit: apply it, drop a duplicate, or refuse it
    with the same ``SyncFailed(lineage_mismatch)`` an internal refusal gets (the audit marks the
    history row refused by its derived id)."""
    result = check_external(state, ev, ownership)
    if result.verdict == Verdict.DUPLICATE:
        return Step(state, [], (), "duplicate")
    if result.verdict == Verdict.REFUSE:
        return Step(state, [lineage_refusal(ev, now, result.detail, "external commit")], (),
                    "refused")
    assert state is not None
    return Step(state.model_copy(update={
        "change_id": ev.change_id,
        "committed_at": ev.occurred_at,
        "commit_sync_id": ev.sync_id,
        "commit_event_id": ev.event_id,
        "replication_type": ev.replication_type,
        "commits": state.commits + 1,
        "last_failure": None,
        "owner": EXTERNAL,
        "external_job_id": ev.origin_job_id,
        # the external copier's replica is not cbtstream's: no replica digest to carry on
        "replica_digest": None,
    }))


def skip_snapshot(state: DiskState, snap: SnapshotTaken, now: datetime) -> Step:
    """A snapshot of a disk its external copier owns: not planned (two copiers must never race
    on one replica). It is superseded by itself, so the snapshot lifecycle still sees the disk
    finish with it; a redelivery republishes the same ``SyncSuperseded``."""
    for e in state.ended:
        if e.outcome == "superseded" and e.snapshot_event_id == snap.event_id:
            return Step(state, [superseded_event(e)], (e,), "redelivered")
    e = Ended(snapshot_event_id=snap.event_id, vm_snapshot=snap.vm_snapshot,
              outcome="superseded", superseded_by=snap.event_id, disk=snap.disk, at=now,
              release=snap.snapshot_device_keys is not None,
              snapshot_device_keys=snap.snapshot_device_keys)
    return Step(state.with_seen(snap.event_id).with_ended(e), [superseded_event(e)], (e,))
