"""One scheduler cycle, decided (pure): for each VM under a policy, snapshot it, skip it, or
leave it, and whether its RPO is at risk or missed.

Time is cut into **slots** per policy: ``[k * interval, (k + 1) * interval)`` from the Unix
epoch, so every scheduler process agrees on them. Rules of :func:`decide`, in order:

0. failed over (``cbtstream failover``, a ``ReplicationHold`` the roof hands in): nothing (no
   snapshot, no RPO judged): the operator runs the VM from its replicas, and the planner would
   refuse the snapshot anyway;
1. outside the policy's window: nothing (no snapshot, no RPO judged);
2. a replication snapshot of cbtstream's is still on the VM (:func:`in_flight`): its copy is
   not finished (the worker removes it once every disk is done with it), so a new one would
   only sit beside it, its delta growing, until the planner superseded it. The VM is **not**
   snapshotted: ``at_risk`` if it is due, else nothing;
3. due (no snapshot known to have been taken in the current slot): ``snapshot``;
4. otherwise nothing.

**RPO missed**, judged in the window whatever the action, only when provable from what the
scheduler sees: the VM's oldest snapshot still being copied is older than the RPO (the replica
holds nothing as new as it), or, with none in flight, the last snapshot taken is older than the
RPO (snapshots failed, the cycle overran, or no scheduler owned the VM). The point is the
creation time of that snapshot; the event for one point is reported once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, time, timedelta
from enum import StrEnum

from cbtstream.vsphere.adapter import InventoryVm, VmSnapshot
from producers.naming import is_replication_snapshot
from producers.policy import Assignment


class Action(StrEnum):
    """What the cycle does with a VM."""

    SNAPSHOT = "snapshot"
    AT_RISK = "at_risk"  # due, but its previous snapshot is still being copied
    NOT_DUE = "not_due"
    OUTSIDE_WINDOW = "outside_window"
    HELD = "held"  # failed over: replication stopped by the operator


@dataclass(frozen=True)
class VmMemory:
    """What a scheduler remembers of a VM (rebuilt from its own events after a restart or a
    rebalance): the last snapshot taken and what was already reported."""

    last_taken: datetime | None = None
    reported_at_risk: str | None = None  # the in-flight snapshot last reported
    reported_missed: datetime | None = None  # the point last reported missed


@dataclass(frozen=True)
class Decision:
    """One VM in one cycle."""

    assignment: Assignment
    action: Action
    slot: datetime
    #: The oldest replication snapshot still on the VM, if any.
    in_flight: VmSnapshot | None = None
    #: Set when the RPO is missed: the creation time of the snapshot that proves it.
    missed_point: datetime | None = None

    @property
    def report_at_risk(self) -> bool:
        return self.action == Action.AT_RISK

    @property
    def vm(self) -> InventoryVm:
        return self.assignment.vm


def slot_start(now: datetime, interval_s: float) -> datetime:
    """Start of the slot holding ``now`` (grid from the Unix epoch)."""
    ts = now.timestamp()
    return datetime.fromtimestamp(math.floor(ts / interval_s) * interval_s, UTC)


def _hm(text: str) -> time:
    h, m = text.split(":")
    return time(int(h), int(m))


def in_window(window: str | None, now: datetime) -> bool:
    """``HH:MM-HH:MM`` in UTC, wrapping midnight when the end is before the start; equal ends
    mean the whole day."""
    if window is None:
        return True
    start, end = (_hm(x) for x in window.split("-"))
    t = now.astimezone(UTC).time()
    if start == end:
        return True
    return start <= t < end if start < end else (t >= start or t < end)


def in_flight(vm: InventoryVm) -> list[VmSnapshot]:
    """The VM's replication snapshots still present, oldest first."""
    return sorted((s for s in vm.snapshots if is_replication_snapshot(s.name, s.description)),
                  key=lambda s: s.created)


def decide(assignment: Assignment, memory: VmMemory, now: datetime,
           held: bool = False) -> Decision:
    """The rules of the module docstring for one VM (pure)."""
    policy, vm = assignment.policy, assignment.vm
    slot = slot_start(now, policy.interval_s)
    if held:
        return Decision(assignment, Action.HELD, slot)
    if not in_window(policy.window, now):
        return Decision(assignment, Action.OUTSIDE_WINDOW, slot)
    flying = in_flight(vm)
    oldest = flying[0] if flying else None
    newest_taken = max([t for t in (memory.last_taken, *(s.created for s in flying))
                        if t is not None], default=None)
    rpo = timedelta(seconds=policy.rpo_s)
    missed: datetime | None = None
    if oldest is not None and now - oldest.created > rpo:
        missed = oldest.created
    elif oldest is None and newest_taken is not None and now - newest_taken > rpo:
        missed = newest_taken
    due = newest_taken is None or newest_taken < slot
    if oldest is not None:
        action = Action.AT_RISK if due else Action.NOT_DUE
    else:
        action = Action.SNAPSHOT if due else Action.NOT_DUE
    return Decision(assignment, action, slot, oldest, missed)


def plan(assignments: Sequence[Assignment], memory: Mapping[str, VmMemory],
         now: datetime, held: Callable[[str], bool] = lambda _: False) -> list[Decision]:
    """Decide every VM (``held``: is it failed over); snapshots first, the longest-waiting
    first (they are the likeliest to miss their RPO if the cycle overruns)."""
    decisions = [decide(a, memory.get(a.vm.vm.instance_uuid, VmMemory()), now,
                        held(a.vm.vm.instance_uuid)) for a in assignments]
    oldest = datetime.min.replace(tzinfo=UTC)
    return sorted(decisions, key=lambda d: (d.action != Action.SNAPSHOT, memory.get(
        d.vm.vm.instance_uuid, VmMemory()).last_taken or oldest))


def to_report(decision: Decision, memory: VmMemory) -> tuple[bool, bool, VmMemory]:
    """(report at risk now, report missed now, memory after reporting): each in-flight
    snapshot is reported at risk once, each missed point once."""
    at_risk = decision.report_at_risk and decision.in_flight is not None and (
        memory.reported_at_risk != decision.in_flight.moref)
    missed = decision.missed_point is not None and memory.reported_missed != (
        decision.missed_point)
    if at_risk and decision.in_flight is not None:
        memory = replace(memory, reported_at_risk=decision.in_flight.moref)
    if missed:
        memory = replace(memory, reported_missed=decision.missed_point)
    return at_risk, missed, memory
