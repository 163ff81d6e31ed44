"""Control events for the audit tests: the site scheduler's reports and change-ID fences."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

from schemas.events import ChangeIdFence, FenceScope, ScheduleEvent, ScheduleKind
from tests.unit.factories import T0

VM_A = uuid.UUID("5012abcd-aaaa-4222-8333-444455556601")
VM_B = uuid.UUID("5012abcd-bbbb-4222-8333-444455556602")
NAMES = {VM_A: "pgtest1", VM_B: "QCDev-Jump05"}


def report(vm: uuid.UUID, kind: ScheduleKind, cycle: int, **fields: Any) -> ScheduleEvent:
    """A ScheduleEvent of ``vm`` in the ``cycle``-th 15 min slot after T0 (gold, RPO 1 h)."""
    at = T0 + timedelta(minutes=15 * cycle)
    return ScheduleEvent(kind=kind, vm_instance_uuid=vm, vm_name=NAMES.get(vm, "vm"),
                         vm_path=f"/DC/vm/{NAMES.get(vm, 'vm')}", vcenter="vc1.example",
                         policy="gold", rpo_s=3600.0, cycle_at=at,
                         occurred_at=at + timedelta(seconds=5), **fields)


def fence(target: str | None, before: datetime, *, scope: FenceScope = FenceScope.VM,
          minutes: int = 60, reason: str = "KB 317933") -> ChangeIdFence:
    return ChangeIdFence(fence_id=uuid.uuid5(uuid.NAMESPACE_URL, f"test:{scope}:{target}"),
                         scope=scope, target=target, before=before, reason=reason,
                         occurred_at=T0 + timedelta(minutes=minutes))


def revoke(f: ChangeIdFence, *, minutes: int) -> ChangeIdFence:
    """What ``cbtstream fence --revoke`` publishes: the same fence, a new event, revoked."""
    return f.model_copy(update={"event_id": uuid.uuid4(), "revoked": True,
                                "occurred_at": T0 + timedelta(minutes=minutes)})


def history() -> tuple[list[ScheduleEvent], list[ChangeIdFence]]:
    """Two VMs over four cycles (one snapshot failure, one RPO at risk, two RPOs missed) and
    two fences, the first one revoked later."""
    reports = [
        report(VM_A, ScheduleKind.SNAPSHOT_TAKEN, 0, vm_snapshot="snapshot-1"),
        report(VM_B, ScheduleKind.SNAPSHOT_TAKEN, 0, vm_snapshot="snapshot-2"),
        report(VM_A, ScheduleKind.RPO_AT_RISK, 1, vm_snapshot="snapshot-1", point_at=T0),
        report(VM_B, ScheduleKind.SNAPSHOT_FAILED, 1, reason="vsphere_timeout",
               detail="CreateSnapshot_Task timed out"),
        report(VM_A, ScheduleKind.RPO_MISSED, 5, vm_snapshot="snapshot-1", point_at=T0),
        report(VM_B, ScheduleKind.RPO_MISSED, 5, point_at=T0),
    ]
    first = fence(str(VM_A), T0, minutes=30)
    fences = [first, fence("esx1.example", T0, scope=FenceScope.HOST, minutes=40),
              revoke(first, minutes=90)]
    return reports, fences
