"""The site scheduler: every ``schedule.tick_s``, read the inventory, apply the policies
(:mod:`producers.policy`), decide the cycle (:mod:`producers.cycle`), report and snapshot.

Order of one cycle (:meth:`SiteScheduler.cycle`):

1. read the inventory (one vCenter) and the tags the policies name; resolve the policies. A
   problem is a warning and a metric here (:meth:`SiteScheduler.check` refuses to start on one);
2. keep the VMs this process owns (``owns``: the partition of the VM's instance uuid on
   ``cbt.schedule.events`` is one of the scheduler group's partitions assigned to it);
3. decide each VM, publish ``ScheduleEvent`` ``rpo_at_risk`` (once per in-flight snapshot) and
   ``rpo_missed`` (once per point);
4. snapshot the due VMs concurrently, at most ``max_snapshots_per_vcenter`` at once and
   ``max_snapshots_per_esxi_host`` per host; each publishes its ``VmDescribed`` and
   ``SnapshotTaken`` events (:func:`producers.snapshot.snapshot_and_publish`; a description that
   cannot be read is counted, ``cbtstream_schedule_descriptions_failed_total``, not a failure),
   then ``ScheduleEvent(snapshot_taken)``, or ``snapshot_failed`` with the error's reason. A
   failure never stops the others.

The scheduler's memory (last snapshot taken, what was reported) is rebuilt from its own events
(:meth:`SiteScheduler.remember`) when it gets partitions, so a VM is not snapshotted twice in a
slot when its owner changes, and reports are not repeated.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Protocol

from pydantic import ValidationError

from cbtstream.config import ScheduleSettings
from cbtstream.errors import CbtStreamError, ConfigError
from cbtstream.metrics import ScheduleMetrics
from cbtstream.vsphere.adapter import Inventory
from cbtstream.vsphere.tags import TagMembers
from producers.cycle import Action, Decision, VmMemory, plan, to_report
from producers.policy import Resolution, all_tags, resolve
from producers.snapshot import EventPublisher, snapshot_and_publish
from schemas.events import ScheduleEvent, ScheduleKind, stable_event_id

log = logging.getLogger(__name__)


class SiteClient(Protocol):
    """What the scheduler needs of :class:`cbtstream.vsphere.adapter.VSphereClient` (and
    through :func:`snapshot_and_publish`)."""

    @property
    def vcenter(self) -> str: ...

    async def inventory(self) -> Inventory: ...


class TagSource(Protocol):
    async def members(self, tags: list[str]) -> TagMembers: ...


class NoTags:
    """A tag source for configurations without tag selectors."""

    async def members(self, tags: list[str]) -> TagMembers:
        return TagMembers(missing=tuple(tags))


@dataclass
class CycleReport:
    """What one cycle did (for logs, tests and the figures)."""

    owned: int = 0
    taken: list[str] = field(default_factory=list)  # VM instance uuids
    failed: list[str] = field(default_factory=list)
    at_risk: list[str] = field(default_factory=list)
    missed: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    duration_s: float = 0.0


def _now() -> datetime:
    return datetime.now(UTC)


class SiteScheduler:
    """Runs cycles for one vCenter; ``owns(vm_instance_uuid)`` says which VMs are this
    process's (all of them by default), ``held(vm_instance_uuid)`` which are failed over (none
    by default)."""

    def __init__(self, client: SiteClient, publisher: EventPublisher, settings: ScheduleSettings,
                 *, tags: TagSource | None = None, metrics: ScheduleMetrics | None = None,
                 owns: Callable[[str], bool] = lambda _: True,
                 held: Callable[[str], bool] = lambda _: False,
                 clock: Callable[[], datetime] = _now) -> None:
        self._client, self._publisher, self._settings = client, publisher, settings
        self._tags = tags or NoTags()
        self._metrics = metrics
        self._owns = owns
        #: Is a VM failed over (the roof hands in the hold book's answer): not snapshotted.
        self._held = held
        self._clock = clock
        self.memory: dict[str, VmMemory] = {}
        self._running: set[asyncio.Task[None]] = set()
        self._paused = False
        #: Set by :meth:`run`'s stop event: no snapshot starts after it, the ones under way
        #: finish (taken and published), so a stop never leaves a snapshot nobody knows of.
        self._stop: asyncio.Event | None = None

    # -- memory ---------------------------------------------------------------------------------
    def remember(self, event: ScheduleEvent) -> None:
        """Fold one of our events (read back from the topic) into the memory."""
        key = str(event.vm_instance_uuid)
        m = self.memory.get(key, VmMemory())
        if event.kind == ScheduleKind.SNAPSHOT_TAKEN and event.point_at is not None:
            if m.last_taken is None or event.point_at > m.last_taken:
                m = replace(m, last_taken=event.point_at)
        elif event.kind == ScheduleKind.RPO_AT_RISK:
            m = replace(m, reported_at_risk=event.vm_snapshot)
        elif event.kind == ScheduleKind.RPO_MISSED:
            m = replace(m, reported_missed=event.point_at)
        self.memory[key] = m

    def remember_record(self, key: bytes | None, value: bytes | None) -> None:
        """:meth:`remember` for a raw record; one that does not decode is logged and ignored."""
        try:
            self.remember(ScheduleEvent.model_validate_json(value or b""))
        except ValidationError as exc:
            log.warning("unreadable schedule event ignored", extra={"error": str(exc)[:300]})

    async def release(self) -> None:
        """Stop starting snapshots, wait for those running and flush what was published (the
        partitions are being taken away: the next owner must see every event). Snapshots
        start again once the caller's ``owns`` answers for new partitions."""
        self._paused = True
        try:
            if self._running:
                await asyncio.wait(set(self._running))
            flush = getattr(self._publisher, "flush", None)
            if flush is not None:
                await flush()
        finally:
            self._paused = False

    # -- policies -------------------------------------------------------------------------------
    async def resolve(self) -> tuple[Inventory, Resolution]:
        inventory = await self._client.inventory()
        policies = self._settings.policies
        tags = await self._tags.members(all_tags(policies))
        return inventory, resolve(policies, inventory, tags)

    async def check(self) -> Resolution:
        """Resolve the policies once; any problem is a :class:`ConfigError` listing them all."""
        if not self._settings.policies:
            raise ConfigError("no schedule policies: add [[schedule.policies]] tables to the "
                              "configuration")
        _, res = await self.resolve()
        if res.problems:
            raise ConfigError("schedule policies: " + "; ".join(p.message for p in res.problems))
        return res

    # -- one cycle ------------------------------------------------------------------------------
    async def cycle(self) -> CycleReport:
        t0 = time.monotonic()
        report = CycleReport()
        _, res = await self.resolve()
        problems: Counter[tuple[str, str]] = Counter()
        for p in res.problems:
            log.warning("schedule policy problem", extra={"policy": p.policy, "kind": p.kind,
                                                          "problem": p.message})
            report.problems.append(p.message)
            problems[(p.policy, p.kind)] += 1
        mine = [a for key, a in res.assignments.items() if self._owns(key)]
        report.owned = len(mine)
        now = self._clock()
        decisions = plan(mine, self.memory, now, self._held)
        states: Counter[tuple[str, str]] = Counter()
        for d in decisions:
            states[(d.assignment.policy.name, "protected")] += 1
            await self._report(d, report, states)
        await self._snapshot_all([d for d in decisions if d.action == Action.SNAPSHOT], report)
        report.duration_s = time.monotonic() - t0
        if self._metrics is not None:
            self._metrics.set_cycle(states, problems, report.duration_s)
        log.info("schedule cycle", extra={
            "owned": report.owned,
            "held": sum(d.action == Action.HELD for d in decisions),
            "taken": len(report.taken), "failed": len(report.failed),
            "rpo_at_risk": len(report.at_risk), "rpo_missed": len(report.missed),
            "problems": len(report.problems), "duration_s": round(report.duration_s, 3)})
        return report

    def _event(self, d: Decision, kind: ScheduleKind, *, vm_snapshot: str | None = None,
               point_at: datetime | None = None, reason: str | None = None, detail: str = "",
               ident: object = None) -> ScheduleEvent:
        vm, policy = d.vm.vm, d.assignment.policy
        return ScheduleEvent(
            event_id=stable_event_id("ScheduleEvent", kind, vm.instance_uuid,
                                     ident if ident is not None else d.slot.isoformat()),
            kind=kind, vm_instance_uuid=uuid.UUID(vm.instance_uuid), vm_name=vm.name,
            vm_path=vm.path,
            vcenter=self._client.vcenter, policy=policy.name, rpo_s=policy.rpo_s,
            cycle_at=d.slot, vm_snapshot=vm_snapshot, point_at=point_at, reason=reason,
            detail=detail[:4096])

    async def _report(self, d: Decision, report: CycleReport,
                      states: Counter[tuple[str, str]]) -> None:
        key, policy = d.vm.vm.instance_uuid, d.assignment.policy.name
        at_risk, missed, after = to_report(d, self.memory.get(key, VmMemory()))
        if d.action == Action.AT_RISK:
            states[(policy, "at_risk")] += 1
        if d.missed_point is not None:
            states[(policy, "missed")] += 1
        if at_risk and d.in_flight is not None:
            flying = d.in_flight
            await self._publisher.publish(self._event(
                d, ScheduleKind.RPO_AT_RISK, vm_snapshot=flying.moref, point_at=flying.created,
                ident=flying.moref, detail=f"snapshot {flying.moref} ({flying.name}) taken "
                f"{flying.created.isoformat()} is still being copied: not snapshotted again"))
            report.at_risk.append(key)
            if self._metrics is not None:
                self._metrics.schedule_at_risk.labels(policy).inc()
            log.warning("rpo at risk: previous snapshot still being copied", extra={
                "vm": key, "path": d.vm.vm.path, "policy": policy, "vm_snapshot": flying.moref})
        if missed and d.missed_point is not None:
            snap = d.in_flight.moref if d.in_flight is not None else None
            await self._publisher.publish(self._event(
                d, ScheduleKind.RPO_MISSED, vm_snapshot=snap, point_at=d.missed_point,
                ident=d.missed_point.isoformat(),
                detail=f"the replica holds nothing newer than {d.missed_point.isoformat()}, "
                f"older than the RPO of {d.assignment.policy.rpo_s:g}s"))
            report.missed.append(key)
            if self._metrics is not None:
                self._metrics.schedule_missed.labels(policy).inc()
            log.error("rpo missed", extra={"vm": key, "path": d.vm.vm.path, "policy": policy,
                                           "point_at": d.missed_point.isoformat()})
        self.memory[key] = after

    async def _snapshot_all(self, due: list[Decision], report: CycleReport) -> None:
        vcenter = asyncio.Semaphore(self._settings.max_snapshots_per_vcenter)
        hosts: dict[str, asyncio.Semaphore] = {}

        async def one(d: Decision) -> None:
            host = hosts.setdefault(d.vm.host, asyncio.Semaphore(
                self._settings.max_snapshots_per_esxi_host))
            async with host, vcenter:
                if self._paused or not self._owns(d.vm.vm.instance_uuid):
                    return  # the VM's partition is being revoked: its next owner decides
                if self._stop is not None and self._stop.is_set():
                    return  # stopping: the next scheduler decides
                await self._snapshot(d, report)

        tasks = [asyncio.create_task(one(d)) for d in due]
        self._running.update(tasks)
        try:
            await asyncio.gather(*tasks)
        finally:
            self._running.difference_update(tasks)

    async def _snapshot(self, d: Decision, report: CycleReport) -> None:
        vm, policy = d.vm.vm, d.assignment.policy
        metrics = self._metrics

        def undescribed() -> None:
            if metrics is not None:
                metrics.schedule_undescribed.labels(policy.name).inc()

        try:
            events = await snapshot_and_publish(
                self._client, self._publisher, vm,  # type: ignore[arg-type]
                quiesce=policy.quiesce, enable_cbt=policy.enable_cbt,
                policy=policy.name, rpo_s=policy.rpo_s, on_undescribed=undescribed)
        except CbtStreamError as exc:
            report.failed.append(vm.instance_uuid)
            if self._metrics is not None:
                self._metrics.schedule_snapshots.labels(policy.name, "failed").inc()
            log.error("scheduled snapshot failed", extra={
                "vm": vm.instance_uuid, "path": vm.path, "policy": policy.name,
                "reason": exc.reason, "error": str(exc)[:300]})
            with contextlib.suppress(CbtStreamError):
                await self._publisher.publish(self._event(
                    d, ScheduleKind.SNAPSHOT_FAILED, reason=exc.reason[:64], detail=str(exc)))
            return
        taken = events[0].taken_at if events else self._clock()
        snap = events[0].vm_snapshot if events else None
        self.memory[vm.instance_uuid] = replace(
            self.memory.get(vm.instance_uuid, VmMemory()), last_taken=taken)
        report.taken.append(vm.instance_uuid)
        if self._metrics is not None:
            self._metrics.schedule_snapshots.labels(policy.name, "taken").inc()
        await self._publisher.publish(self._event(
            d, ScheduleKind.SNAPSHOT_TAKEN, vm_snapshot=snap, point_at=taken))

    # -- loop -----------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event, *, cycles: int | None = None) -> int:
        """Cycle every ``tick_s`` until ``stop`` (or ``cycles`` cycles); returns the number of
        failed snapshots. A cycle that fails as a whole (vCenter unreachable) is logged and
        retried at the next tick."""
        failures, done = 0, 0
        self._stop = stop
        tick, start = self._settings.tick_s, time.monotonic()
        while not stop.is_set() and (cycles is None or done < cycles):
            try:
                failures += len((await self.cycle()).failed)
            except CbtStreamError as exc:
                log.error("schedule cycle failed", extra={"reason": exc.reason,
                                                          "error": str(exc)[:300]})
            done += 1
            if cycles is not None and done >= cycles:
                break
            # the next tick on the grid (an overrun cycle is followed at once, never doubled)
            ticks = (time.monotonic() - start) // tick + 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), start + ticks * tick - time.monotonic())
        return failures
