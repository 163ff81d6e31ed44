"""``cbtstream cutover``: stop a VM, copy its final state, prove it, and hand it over.

Run on the copier host that keeps the VM's replicas (like ``failover``), with vSphere access.
The order, and why each step comes where it does:

1. **Find the VM and its replicas.** Every disk the final snapshot captures must have a replica
   record on this host; the records are found as ``verify`` finds them.
2. **Stop the VM.** A VM that is powered on (or suspended) is refused unless the operator says
   how to stop it: ``--shutdown`` (guest shutdown through VMware Tools, waited for up to
   ``--shutdown-timeout``) or ``--power-off`` (hard). A VM that is already off stays off. Its
   disks then no longer change, so the final snapshot is its final state.
3. **Final snapshot**, published like any other (``VmDescribed`` first, then one
   ``SnapshotTaken`` per disk) but *kept*: its events name no ``snapshot_device_keys``, so the
   pipeline does not remove it after the syncs; this command needs its export in step 5.
4. **Final syncs.** Each disk's outcome for that snapshot is awaited (``--wait`` seconds). One
   that is not a commit (a failure, a supersede) ends the cutover: nothing is held, the VM stays
   stopped, the snapshot is removed; run the command again (the VM is off: no ``--shutdown``).
5. **Proof.** Each replica is re-hashed and compared with its commit's root *and* with the
   root of the final snapshot's export (``verify --source``), under the replica's lock. Any
   disk not equal ends the cutover as in 4 (the replica is marked ``mismatch``).
6. **Hold.** ``ReplicationHold(cut_over)``: every planner refuses later snapshots of the VM
   (``SyncFailed(vm_cut_over)``); then each replica record is marked handed over, so a copier
   refuses any plan for it (``replica_failed_over``), also one produced by hand.
7. **Hand-over.** ``CutoverCompleted`` on ``cbt.vm.cutovers``: each disk's replica location and
   digest (as proven), the VM's description read at the final snapshot, the timeline. Then the
   final snapshot is removed (``--keep-snapshot`` leaves it).

A cutover that stopped in step 4 or 5 can be run again; one that stopped after 6 too (the hold
is published again, marking an already handed-over replica changes nothing), but its final
snapshot is then a new one: the VM is off, so its content is the same.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from cbtctl.watcher import Watcher
from cbtstream.config import Settings
from cbtstream.errors import CbtStreamError, ConfigError
from cbtstream.kafka import Publisher
from cbtstream.vsphere.adapter import VmRef, VSphereClient
from schemas.disk import DiskRef
from schemas.events import (
    ChangeIdCommitted,
    CutoverCompleted,
    CutoverDisk,
    HoldState,
    ReplicationHold,
    SnapshotTaken,
    VmDescribed,
)

Stop = Literal["shutdown", "power_off"]


class CutoverFailed(CbtStreamError):
    """The cutover stopped before the hand-over; the message says at which step and why.
    ``syncs_running``: a final sync may still be copying (its snapshot must stay)."""

    reason = "cutover_failed"

    def __init__(self, message: str, *, syncs_running: bool = False) -> None:
        super().__init__(message)
        self.syncs_running = syncs_running


@dataclass
class Timeline:
    """Seconds from the start to the end of each step (what the closing note reports)."""

    started: float = field(default_factory=time.monotonic)
    steps: dict[str, float] = field(default_factory=dict)
    say: Callable[[str], None] = print

    def mark(self, step: str, what: str) -> None:
        self.steps[step] = round(time.monotonic() - self.started, 3)
        self.say(f"{self.steps[step]:8.1f}s  {step:<9} {what}")


@dataclass(frozen=True)
class CutoverRequest:
    vm: str
    stop: Stop | None
    shutdown_timeout_s: float
    wait_s: float
    reason: str
    keep_snapshot: bool


async def stop_vm(client: VSphereClient, ref: VmRef, stop: Stop | None,
                  shutdown_timeout_s: float) -> Literal["shutdown", "power_off", "was_off"]:
    """Step 2: the VM powered off, or :class:`ConfigError` if it runs and ``stop`` is None."""
    state = await client.power_state(ref)
    if state == "poweredOff":
        return "was_off"
    if stop is None:
        raise ConfigError(
            f"{ref.path or ref.instance_uuid} is {state}: a cutover copies the final state of a "
            "stopped VM. Give --shutdown (guest shutdown through VMware Tools) or --power-off")
    if stop == "shutdown":
        await client.shutdown_guest(ref, shutdown_timeout_s)
        return "shutdown"
    await client.power_off(ref)
    return "power_off"


async def run_cutover(req: CutoverRequest, settings: Settings, client: VSphereClient,
                      timeline: Timeline) -> CutoverCompleted:
    """Steps 1 to 7 (see the module docstring)."""
    from cbtctl.commands.failover import find_vm_records
    from producers.snapshot import resolve_vm, snapshot_and_publish

    ref = await resolve_vm(client, req.vm)
    vm = ref.instance_uuid.lower()
    found = {f.disk_key: f for f in find_vm_records(settings, vm)}
    if not found:
        raise ConfigError(f"no replica record on this host names the VM {vm}: run the cutover "
                          "on the copier host that keeps its replicas")
    timeline.mark("found", f"{ref.path or vm}: {len(found)} replica record(s) on this host")
    stopped_by = await stop_vm(client, ref, req.stop, req.shutdown_timeout_s)
    timeline.mark("stopped", stopped_by.replace("_", " "))

    described: list[VmDescribed] = []
    async with Publisher(settings.kafka) as pub:
        watcher = Watcher(settings, vm)
        await watcher.start()
        try:
            events = await snapshot_and_publish(client, pub, ref, keep=True,
                                                on_described=described.append)
            snap = events[0]
            timeline.mark("snapshot", f"{snap.vm_snapshot}: {len(events)} disk(s)")
            try:
                commits = await _final_syncs(watcher, events, found, req.wait_s)
                timeline.mark("synced", ", ".join(
                    f"disk-{c.disk.device_key} {c.replication_type.value}"
                    for c in commits.values()))
                disks = await _prove(settings, events, commits, found, req.wait_s)
                timeline.mark("verified", f"{len(disks)} replica(s) equal to the snapshot")
            except CutoverFailed as exc:
                # a sync still copying from the snapshot keeps it (the orphan reconcile removes
                # it once no sync needs it); otherwise it is removed now
                await _remove(client, snap, keep=exc.syncs_running)
                raise
            hold = ReplicationHold(vm_instance_uuid=uuid.UUID(vm), state=HoldState.CUT_OVER,
                                   reason=req.reason or f"cut over at {snap.vm_snapshot}")
            await pub.publish(hold)  # first: no new plan for the VM from here on
            await _hand_over(found, hold.reason, req.wait_s)
            timeline.mark("held", "cut_over: later snapshots refused, replicas handed over")
            done = CutoverCompleted(
                vm_instance_uuid=uuid.UUID(vm), vcenter=snap.vcenter,
                vm_snapshot=snap.vm_snapshot, taken_at=snap.taken_at, stopped_by=stopped_by,
                reason=hold.reason, disks=_in_controller_order(disks, described),
                description=described[0].description if described else None,
                timeline=dict(timeline.steps))
            await pub.publish(done)
        finally:
            await watcher.stop()
    await _remove(client, snap, keep=req.keep_snapshot)
    timeline.mark("completed", f"CutoverCompleted published; snapshot "
                  f"{'kept' if req.keep_snapshot else 'removed'}")
    return done


async def _final_syncs(watcher: Watcher, events: list[SnapshotTaken], found: dict[str, object],
                       wait_s: float) -> dict[int, ChangeIdCommitted]:
    """Step 4: every disk's commit of the final snapshot (or :class:`CutoverFailed`)."""
    missing = [e.disk.key for e in events if e.disk.key not in found]
    if missing:
        raise CutoverFailed(f"no replica record on this host for {', '.join(missing)}: its "
                            "replica is elsewhere (run the cutover there) or was never copied")
    snap = events[0].vm_snapshot
    keys = {e.disk.device_key for e in events}
    try:
        await watcher.wait_for(lambda: keys <= set(watcher.outcomes(snap)), wait_s)
    except TimeoutError:
        late = sorted(keys - set(watcher.outcomes(snap)))
        raise CutoverFailed(f"the final syncs of {snap} did not end within {wait_s:.0f}s "
                            f"(disks {late}); is the pipeline running? The snapshot is kept "
                            "for them", syncs_running=True) from None
    outcomes = watcher.outcomes(snap)
    bad = {k: o for k, o in outcomes.items() if k in keys and not isinstance(o, ChangeIdCommitted)}
    if bad:
        raise CutoverFailed("final sync not committed: " + "; ".join(
            f"disk-{k} {o.event_type} {getattr(o, 'reason', '')} {getattr(o, 'detail', '')[:200]}"
            for k, o in sorted(bad.items())))
    return {k: o for k, o in outcomes.items()
            if k in keys and isinstance(o, ChangeIdCommitted)}


async def _prove(settings: Settings, events: list[SnapshotTaken],
                 commits: dict[int, ChangeIdCommitted], found: dict[str, object],
                 wait_s: float) -> list[CutoverDisk]:
    """Step 5: each replica equal to its commit's root and to the snapshot's export."""
    from functools import partial

    from cbtctl.commands.verify import hash_source
    from cbtstream.tls import nbd_tls_context
    from consumers.replica.verify import Found, check_replica, read_local_or_nbd

    read = partial(read_local_or_nbd, tls_context=nbd_tls_context(settings.copier))
    out, problems = [], []
    for ev in events:
        commit = commits[ev.disk.device_key]
        f = found[ev.disk.key]
        assert isinstance(f, Found)
        if commit.replica_digest is None:
            problems.append(f"{ev.disk.key}: its commit names no replica digest")
            continue
        like = commit.replica_digest

        async def source(state: object, disk: DiskRef = ev.disk, like: str = like
                         ) -> str | None:
            return await hash_source(settings, disk, events[0].vm_snapshot, like,
                                     disk.capacity_bytes)

        check = await check_replica(f.location, read, latest=(commit.change_id, like),
                                    source_root=source, mark=True, wait_s=wait_s)
        held = check.state.held if check.state is not None else None
        if (check.result != "equal" or held is None or held.sync_id != commit.sync_id
                or check.source_digest is None or check.source_digest != check.replica_digest):
            problems.append(f"{ev.disk.key}: {check.result}: {check.detail or 'not proven'} "
                            f"(replica {check.replica_digest}, snapshot {check.source_digest})")
            continue
        assert check.replica_digest is not None
        out.append(CutoverDisk(disk=ev.disk, change_id=commit.change_id, sync_id=commit.sync_id,
                               replica_location=f.location.location,
                               replica_digest=check.replica_digest,
                               source_digest=check.source_digest))
    if problems:
        raise CutoverFailed("a replica is not proven equal to the final snapshot: "
                            + "; ".join(problems))
    return out


async def _hand_over(found: dict[str, object], reason: str, wait_s: float) -> None:
    """Step 6's second half: each replica record handed over (a copier refuses to write it)."""
    from consumers.replica.failover import hand_over
    from consumers.replica.verify import Found

    busy = []
    for f in found.values():
        assert isinstance(f, Found)
        handed = await hand_over(f, reason, wait_s)
        if not handed.ok:
            busy.append(f"{handed.disk_key}: {handed.detail}")
    if busy:
        raise CutoverFailed("the hold is published but a replica was not handed over: "
                            + "; ".join(busy) + " (run the cutover again)")


def _in_controller_order(disks: list[CutoverDisk], described: list[VmDescribed]
                         ) -> tuple[CutoverDisk, ...]:
    """The disks in the description's controller order (device key order without one)."""
    if not described:
        return tuple(sorted(disks, key=lambda d: d.disk.device_key))
    order = {d.device_key: i for i, d in enumerate(described[0].description.disks)}
    return tuple(sorted(disks, key=lambda d: (order.get(d.disk.device_key, len(order)),
                                              d.disk.device_key)))


async def _remove(client: VSphereClient, snap: SnapshotTaken, *, keep: bool) -> None:
    """Remove the final snapshot (the pipeline does not: it was published as kept)."""
    if keep:
        return
    from cbtstream.vsphere.errors import VSphereNotFound

    try:
        await client.remove_vm_snapshot(snap.disk.vm_instance_uuid, snap.vm_snapshot)
    except VSphereNotFound:
        pass
    except Exception as exc:  # the cutover's outcome stands; say what is left behind
        print(f"warning: snapshot {snap.vm_snapshot} not removed ({exc}): remove it by hand")

