"""Realistic event histories for audit tests, produced by the real pure planner and guard.

A :class:`Fleet` plays the pipeline without Kafka: snapshots per VM (one per disk), the planner's
``SyncPlanned``, progress, the copier's ``ChangeIdCommitted`` (uuid5 event id, like
``consumers.copier.commit_event``) and the planner's answer to it (nothing, or a
``SyncFailed(lineage_mismatch)`` for a refused commit). Times advance deterministically.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from schemas.disk import DiskRef
from schemas.events import (
    ChangeIdCommitted,
    Event,
    SnapshotRemoved,
    SnapshotTaken,
    SyncPlanned,
    SyncProgress,
    stable_event_id,
)
from streams import planner
from streams.state import DiskState

T0 = datetime(2026, 11, 1, 8, 0, tzinfo=UTC)


def epoch(n: int) -> str:
    h = f"{n:032x}"
    return " ".join(h[i:i + 2] for i in range(0, 16, 2)) + "-" + " ".join(
        h[i:i + 2] for i in range(16, 32, 2))


@dataclass
class Vm:
    name: str
    path: str
    uuid: str
    device_keys: tuple[int, ...]
    cbt_epoch: dict[int, int] = field(default_factory=dict)
    sequence: int = 0
    snapshots: int = 0

    def disk(self, key: int) -> DiskRef:
        return DiskRef(vm_instance_uuid=self.uuid, vm_path=self.path, vm_name=self.name,
                       device_key=key, backing_uuid=f"6000C29{key:05d}-{self.uuid[:8]}",
                       backing_file=f"[ds1] {self.name}/{self.name}_{key}.vmdk",
                       capacity_bytes=(8 << 30) + key * 4096)


def vm(name: str, device_keys: tuple[int, ...], path: str | None = None) -> Vm:
    u = str(uuid.uuid5(uuid.NAMESPACE_URL, f"cbtstream-test/{name}/{uuid.uuid4()}"))
    vm_ = Vm(name, path or f"/DatabanxDC/vm/{name}", u, device_keys)
    vm_.cbt_epoch = {k: 100 + k for k in device_keys}
    return vm_


class Fleet:
    """Plays cycles of the pipeline for some VMs and keeps every event in log order."""

    def __init__(self, start: datetime = T0) -> None:
        self.now = start
        self.events: list[Event] = []
        self.state: dict[str, DiskState | None] = {}

    def tick(self, seconds: float = 1.0) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now

    def snapshot(self, v: Vm) -> list[SyncPlanned]:
        v.snapshots += 1
        v.sequence += 7
        name = f"snapshot-{v.snapshots}"
        taken_at = self.tick()
        plans: list[SyncPlanned] = []
        for key in v.device_keys:
            disk = v.disk(key)
            snap = SnapshotTaken(disk=disk, vcenter="vc.test", vm_snapshot=name,
                                 snapshot_name=f"cbtstream {v.snapshots}",
                                 change_id=f"{epoch(v.cbt_epoch[key])}/{v.sequence}",
                                 taken_at=taken_at, occurred_at=self.tick(0.01),
                                 snapshot_device_keys=v.device_keys)
            self.events.append(snap)
            state, out = planner.on_snapshot(self.state.get(disk.key), snap, self.tick(0.01))
            self.state[disk.key] = state
            self.events.extend(out)
            plans += [o for o in out if isinstance(o, SyncPlanned)]
        return plans

    def copy(self, plan: SyncPlanned, *, previous: str | bool | None = False,
             progress: int = 2) -> ChangeIdCommitted:
        """The copier finished ``plan``; ``previous`` overrides the commit's previous change ID
        (a buggy copier), which the planner's guard refuses."""
        total = plan.disk.capacity_bytes // (1 if plan.replication_type == "full" else 64)
        for i in range(1, progress + 1):
            self.events.append(SyncProgress(disk=plan.disk, sync_id=plan.sync_id,
                                            bytes_done=total * i // progress, bytes_total=total,
                                            rate_bytes_per_s=1e8, occurred_at=self.tick(0.5)))
        assert plan.change_id is not None
        commit = ChangeIdCommitted(
            event_id=stable_event_id("ChangeIdCommitted", plan.sync_id),
            occurred_at=self.tick(),
            disk=plan.disk, sync_id=plan.sync_id, vm_snapshot=plan.vm_snapshot,
            previous_change_id=plan.previous_change_id if previous is False else previous,
            change_id=plan.change_id, replication_type=plan.replication_type,
            reason=plan.reason, bytes_copied=total // 2, bytes_zeroed=total // 4, extents=12,
            digest=f"sha256:{uuid.uuid5(plan.sync_id, 'digest').hex}", duration_s=1.25)
        self.events.append(commit)
        state, out = planner.on_commit(self.state.get(plan.disk.key), commit, self.tick(0.01))
        self.state[plan.disk.key] = state
        self.events.extend(out)
        return commit

    def remove(self, plans: list[SyncPlanned]) -> None:
        at = self.tick()
        for p in plans:
            self.events.append(SnapshotRemoved(
                event_id=stable_event_id("SnapshotRemoved", p.disk.key, p.vm_snapshot),
                disk=p.disk, vm_snapshot=p.vm_snapshot, occurred_at=at))

    def cycle(self, *vms: Vm) -> list[SyncPlanned]:
        """One snapshot per VM, every disk copied and committed, snapshot removed."""
        done: list[SyncPlanned] = []
        for v in vms:
            plans = self.snapshot(v)
            for p in plans:
                self.copy(p)
            self.remove(plans)
            done += plans
            self.tick(60)
        return done
