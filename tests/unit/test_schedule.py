"""The site scheduler's pure rules (policy matching, cycle decisions) and its cycle with a fake
vCenter: concurrency bounds, at-risk skips, reports once, memory from its own events."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import BaseModel

from cbtstream.config import SchedulePolicy, ScheduleSettings, load_settings
from cbtstream.errors import ConfigError
from cbtstream.vsphere.adapter import (
    Inventory,
    InventoryVm,
    SnapshotInfo,
    VmRef,
    VmSnapshot,
)
from cbtstream.vsphere.tags import TagMembers
from producers.cycle import Action, VmMemory, decide, in_window, plan, slot_start, to_report
from producers.naming import SNAPSHOT_DESCRIPTION
from producers.policy import Assignment, resolve
from producers.site import SiteScheduler
from schemas.events import ScheduleEvent, ScheduleKind, SnapshotTaken, VmDescribed
from tests.unit.factories import vm_description

T0 = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)


def vm(name: str, *, folder: str = "/DC0/vm", host: str = "h0", cluster: str | None = None,
       snaps: tuple[tuple[str, datetime], ...] = ()) -> InventoryVm:
    uid = str(uuid.uuid5(uuid.NAMESPACE_DNS, name))
    ref = VmRef(moref=f"vm-{name}", name=name, instance_uuid=uid, path=f"{folder}/{name}")
    return InventoryVm(vm=ref, folder=folder, host=host, cluster=cluster, snapshots=tuple(
        VmSnapshot(ref, moref, f"cbtstream-{moref}", SNAPSHOT_DESCRIPTION, created)
        for moref, created in snaps))


def inventory(*vms: InventoryVm, folders: tuple[str, ...] = (),
              clusters: tuple[str, ...] = ()) -> Inventory:
    return Inventory(vms=vms, folders=frozenset({"/DC0/vm", *folders, *(v.folder for v in vms)}),
                     clusters=frozenset({*clusters, *(v.cluster for v in vms if v.cluster)}))


def policy(name: str = "gold", rpo_s: float = 900, **kw: Any) -> SchedulePolicy:
    if not {"folders", "clusters", "tags", "names", "vms"} & kw.keys():
        kw["names"] = ("*",)
    return SchedulePolicy(name=name, rpo_s=rpo_s, **kw)


# -- policies ------------------------------------------------------------------------------------
def test_each_selector_matches_and_folders_include_subfolders() -> None:
    a = vm("web-1", folder="/DC0/vm/prod/web")
    b = vm("db-1", cluster="C1")
    c = vm("app-1")
    d = vm("other")
    inv = inventory(a, b, c, d, folders=("/DC0/vm/prod",))
    tags = TagMembers(vms={"backup/gold": frozenset({"vm-app-1"})})
    res = resolve([policy(folders=("/DC0/vm/prod",)), policy("silver", clusters=("C1",)),
                   policy("tagged", tags=("backup/gold",)),
                   policy("listed", vms=(d.vm.instance_uuid.upper(),))], inv, tags)
    assert res.problems == ()
    by = {a.vm.vm.name: a.policy.name for a in res.assignments.values()}
    assert by == {"web-1": "gold", "db-1": "silver", "app-1": "tagged", "other": "listed"}


def test_name_patterns_pick_up_a_vm_that_appears_later() -> None:
    p = policy(names=("web-*",))
    assert resolve([p], inventory(vm("web-1")), TagMembers()).assignments.keys() == {
        vm("web-1").vm.instance_uuid}
    later = resolve([p], inventory(vm("web-1"), vm("web-2"), vm("db")), TagMembers())
    assert {a.vm.vm.name for a in later.assignments.values()} == {"web-1", "web-2"}


@pytest.mark.parametrize(("kw", "kind", "text"), [
    ({"folders": ("/DC0/vm/nope",)}, "missing_folder", "folder '/DC0/vm/nope' does not exist"),
    ({"clusters": ("C9",)}, "missing_cluster", "cluster 'C9' does not exist"),
    ({"tags": ("backup/none",)}, "missing_tag", "tag 'backup/none' does not exist"),
    ({"vms": ("/DC0/vm/ghost",)}, "missing_vm", "VM '/DC0/vm/ghost' is not in the inventory"),
    ({"names": ("zzz-*",)}, "no_match", "policy 'gold' matches no VM"),
])
def test_a_bad_policy_is_a_problem_naming_it(kw: dict[str, Any], kind: str, text: str) -> None:
    res = resolve([policy(**kw)], inventory(vm("web-1")), TagMembers(missing=("backup/none",)))
    assert kind in {p.kind for p in res.problems}
    assert any(text in p.message and p.policy == "gold" for p in res.problems)


def test_two_policies_with_different_rpos_are_a_conflict_and_the_stricter_wins() -> None:
    res = resolve([policy("slow", rpo_s=3600, names=("web-*",)),
                   policy("fast", rpo_s=600, names=("web-1",))], inventory(vm("web-1")),
                  TagMembers())
    [problem] = res.problems
    assert problem.kind == "conflict" and "'slow'" in problem.message and "'fast'" in (
        problem.message)
    assert next(iter(res.assignments.values())).policy.name == "fast"
    same = resolve([policy("a", names=("web-*",)), policy("b", names=("web-1",))],
                   inventory(vm("web-1")), TagMembers())
    assert same.problems == () and next(iter(same.assignments.values())).policy.name == "a"


def test_config_refuses_a_policy_without_selector_or_with_every_above_rpo() -> None:
    with pytest.raises(ConfigError, match="'gold' selects no VM"):
        load_settings(schedule={"policies": [{"name": "gold", "rpo_s": 900}]})
    with pytest.raises(ConfigError, match=r"every_s .* longer than rpo_s"):
        load_settings(schedule={"policies": [{"name": "gold", "rpo_s": 900, "every_s": 1000,
                                              "names": ["*"]}]})
    with pytest.raises(ConfigError, match="named twice: gold"):
        load_settings(schedule={"policies": [{"name": "gold", "rpo_s": 9, "names": ["*"]}] * 2})
    s = load_settings(schedule={"policies": [{"name": "gold", "rpo_s": 900, "names": ["*"]}]})
    assert s.schedule.policies[0].interval_s == 450


# -- cycle ---------------------------------------------------------------------------------------
def test_slots_and_windows() -> None:
    assert slot_start(T0 + timedelta(minutes=7), 900) == T0
    assert slot_start(T0 + timedelta(minutes=15), 900) == T0 + timedelta(minutes=15)
    assert in_window("22:00-06:00", T0.replace(hour=23)) and in_window(
        "22:00-06:00", T0.replace(hour=5))
    assert not in_window("22:00-06:00", T0) and in_window("09:00-17:00", T0)
    assert in_window(None, T0) and in_window("00:00-00:00", T0)


def test_due_vm_is_snapshotted_once_per_slot() -> None:
    a = Assignment(vm("web-1"), policy(rpo_s=900))  # every 450 s
    assert decide(a, VmMemory(), T0).action == Action.SNAPSHOT
    taken = VmMemory(last_taken=T0 + timedelta(seconds=1))
    assert decide(a, taken, T0 + timedelta(seconds=100)).action == Action.NOT_DUE
    assert decide(a, taken, T0 + timedelta(seconds=450)).action == Action.SNAPSHOT


def test_vm_still_being_copied_is_at_risk_not_snapshotted_and_reported_once() -> None:
    a = Assignment(vm("web-1", snaps=(("snapshot-1", T0 - timedelta(seconds=500)),)),
                   policy(rpo_s=900))
    d = decide(a, VmMemory(), T0)
    assert d.action == Action.AT_RISK and d.in_flight is not None
    assert d.missed_point is None
    at_risk, missed, after = to_report(d, VmMemory())
    assert at_risk and not missed
    assert to_report(d, after)[:2] == (False, False)  # the same snapshot: reported once


def test_rpo_missed_is_proven_by_an_old_snapshot_in_flight_or_an_old_last_snapshot() -> None:
    old = T0 - timedelta(seconds=1000)
    flying = Assignment(vm("web-1", snaps=(("snapshot-1", old),)), policy(rpo_s=900))
    assert decide(flying, VmMemory(), T0).missed_point == old
    stale = Assignment(vm("web-1"), policy(rpo_s=900))
    d = decide(stale, VmMemory(last_taken=old), T0)
    assert d.action == Action.SNAPSHOT and d.missed_point == old
    assert decide(stale, VmMemory(), T0).missed_point is None  # nothing known: not proven


def test_outside_the_window_nothing_happens() -> None:
    a = Assignment(vm("web-1"), policy(window="22:00-06:00"))
    assert decide(a, VmMemory(last_taken=T0 - timedelta(days=2)), T0).action == (
        Action.OUTSIDE_WINDOW)


def test_plan_puts_the_longest_waiting_snapshots_first() -> None:
    a, b = vm("a"), vm("b")
    mem = {a.vm.instance_uuid: VmMemory(last_taken=T0 - timedelta(hours=1)),
           b.vm.instance_uuid: VmMemory(last_taken=T0 - timedelta(hours=2))}
    order = [d.vm.vm.name for d in plan([Assignment(a, policy()), Assignment(b, policy())],
                                        mem, T0)]
    assert order == ["b", "a"]


# -- the cycle with a fake vCenter ---------------------------------------------------------------
class FakeVCenter:
    """Snapshots take ``delay`` seconds; records the concurrency per host and overall."""

    vcenter = "vc.example"

    def __init__(self, vms: list[InventoryVm], delay: float = 0.0) -> None:
        self.vms = {v.vm.instance_uuid: v for v in vms}
        self.delay = delay
        self.running: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.peak_total = 0
        self.taken: list[str] = []
        self.undescribable: set[str] = set()  # VM names whose description cannot be read

    async def inventory(self) -> Inventory:
        return inventory(*self.vms.values())

    async def cbt_status(self, ref: VmRef) -> Any:
        from cbtstream.vsphere.adapter import CbtStatus

        return CbtStatus(vm=ref, enabled=True, active=True)

    async def create_snapshot(self, ref: VmRef, name: str, **kw: Any) -> SnapshotInfo:
        host = self.vms[ref.instance_uuid].host
        self.running[host] = self.running.get(host, 0) + 1
        self.peak[host] = max(self.peak.get(host, 0), self.running[host])
        self.peak_total = max(self.peak_total, sum(self.running.values()))
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.running[host] -= 1
        self.taken.append(ref.instance_uuid)
        return SnapshotInfo(moref=f"snapshot-{len(self.taken)}", name=name,
                            created=datetime.now(UTC), vm=ref, quiesced=False, disks=[])

    async def vm_host(self, ref: VmRef) -> Any:
        from cbtstream.vsphere.adapter import HostRef

        return HostRef(moref="host-1", name=self.vms[ref.instance_uuid].host, thumbprint="")

    async def describe_vm(self, ref: VmRef) -> Any:
        if ref.name in self.undescribable:
            from cbtstream.vsphere.errors import VSphereError

            raise VSphereError(f"describe {ref.path}: connection reset")
        return vm_description(ref.instance_uuid, ref.name)


class ListPublisher:
    def __init__(self) -> None:
        self.events: list[BaseModel] = []

    async def publish(self, event: BaseModel) -> tuple[int, int]:
        self.events.append(event)
        return 0, len(self.events)

    def schedule_events(self, kind: ScheduleKind) -> list[ScheduleEvent]:
        return [e for e in self.events if isinstance(e, ScheduleEvent) and e.kind == kind]


def _settings(**kw: Any) -> ScheduleSettings:
    return ScheduleSettings(policies=(policy(names=("*",)),), **kw)


async def test_snapshots_run_concurrently_within_the_vcenter_and_host_bounds() -> None:
    vms = [vm(f"v{i}", host=f"h{i % 4}") for i in range(40)]
    fake, pub = FakeVCenter(vms, delay=0.02), ListPublisher()
    sched = SiteScheduler(fake, pub, _settings(max_snapshots_per_vcenter=6,
                                               max_snapshots_per_esxi_host=2))
    report = await sched.cycle()
    assert len(report.taken) == 40 and len(fake.taken) == 40
    assert fake.peak_total == 6 and max(fake.peak.values()) == 2
    assert len(pub.schedule_events(ScheduleKind.SNAPSHOT_TAKEN)) == 40
    assert not any(isinstance(e, SnapshotTaken) for e in pub.events)  # the fake has no disks
    again = await sched.cycle()  # same slot: nothing is due
    assert again.taken == [] and len(fake.taken) == 40


async def test_each_snapshot_is_described_and_a_failed_description_is_counted() -> None:
    from cbtstream.metrics import ScheduleMetrics

    fake, pub, metrics = FakeVCenter([vm("a"), vm("b")]), ListPublisher(), ScheduleMetrics()
    fake.undescribable.add("b")
    report = await SiteScheduler(fake, pub, _settings(), metrics=metrics).cycle()
    assert sorted(report.taken) == sorted(v.vm.instance_uuid for v in (vm("a"), vm("b")))
    [described] = [e for e in pub.events if isinstance(e, VmDescribed)]
    assert described.description.name == "a"
    assert len(pub.schedule_events(ScheduleKind.SNAPSHOT_TAKEN)) == 2  # b's snapshot stands
    text = metrics.render().decode()
    assert 'cbtstream_schedule_descriptions_failed_total{policy="gold"} 1.0' in text


async def test_snapshots_run_concurrently_up_to_the_bounds_and_no_further() -> None:
    """One at a time with bounds of 1; with 16 per vCenter and 4 per host, 100 VMs on 10 hosts
    fill the vCenter bound (the times are printed, not asserted: speed is the bench's)."""
    vms = [vm(f"v{i}", host=f"h{i % 10}") for i in range(100)]
    times, peaks = {}, {}
    for per_vc, per_host in ((1, 1), (16, 4)):
        fake = FakeVCenter(vms, delay=0.05)
        sched = SiteScheduler(fake, ListPublisher(), _settings(
            max_snapshots_per_vcenter=per_vc, max_snapshots_per_esxi_host=per_host))
        t0 = time.monotonic()
        report = await sched.cycle()
        times[per_vc] = time.monotonic() - t0
        peaks[per_vc] = (fake.peak_total, max(fake.peak.values()))
        assert len(report.taken) == 100 and len(set(fake.taken)) == 100
    print(f"\n100 VMs x 50 ms: one at a time {times[1]:.2f}s, 16/vCenter 4/host "
          f"{times[16]:.2f}s")
    assert peaks[1] == (1, 1)
    assert peaks[16][0] == 16 and peaks[16][1] <= 4  # the host bound: see the test above


async def test_a_failed_over_vm_is_not_snapshotted_nor_judged_until_released() -> None:
    """``cbtstream failover`` holds a VM: the scheduler takes no snapshot of it and reports no
    RPO (its replica is the operator's); released, it is snapshotted again."""
    held = vm("dr-1", snaps=(("snapshot-3", datetime.now(UTC) - timedelta(days=1)),))
    fake, pub = FakeVCenter([held, vm("web-1")]), ListPublisher()
    holds = {held.vm.instance_uuid}
    sched = SiteScheduler(fake, pub, _settings(), held=lambda uuid: uuid in holds)
    report = await sched.cycle()
    assert fake.taken == [vm("web-1").vm.instance_uuid]
    assert report.at_risk == [] and report.missed == []
    assert not pub.schedule_events(ScheduleKind.RPO_MISSED)
    holds.clear()
    fresh = vm("dr-1")  # its old snapshot gone (the planner refused and removed it)
    fake.vms[fresh.vm.instance_uuid] = fresh
    await sched.cycle()
    assert held.vm.instance_uuid in fake.taken


async def test_a_stop_starts_no_snapshot_and_finishes_those_under_way() -> None:
    """SIGTERM in the middle of a cycle: the snapshots being taken are taken and published
    (their disks' events are out, so the pipeline removes them); no other starts. A stop that
    waited for the whole cycle was killed after its grace period and left snapshots that no
    event names on the VMs (3-4 of them in the 1,000-VM site test)."""
    vms = [vm(f"v{i}", host=f"h{i % 10}") for i in range(100)]
    fake, pub = FakeVCenter(vms, delay=0.05), ListPublisher()
    sched = SiteScheduler(fake, pub, _settings(max_snapshots_per_vcenter=4,
                                               max_snapshots_per_esxi_host=4))
    stop = asyncio.Event()
    run = asyncio.create_task(sched.run(stop))
    for _ in range(500):  # until the first four are under way
        if fake.peak_total >= 4:
            break
        await asyncio.sleep(0.01)
    stop.set()
    await asyncio.wait_for(run, 5)
    taken = [e for e in pub.schedule_events(ScheduleKind.SNAPSHOT_TAKEN)]
    assert 4 <= len(fake.taken) < 100  # the ones under way, not the rest of the cycle
    assert sorted(str(e.vm_instance_uuid) for e in taken) == sorted(fake.taken)
    assert sum(fake.running.values()) == 0


async def test_a_vm_still_being_copied_is_skipped_and_reported_at_risk_once() -> None:
    # taken in an earlier slot (every 450 s), younger than the RPO (900 s)
    busy = vm("busy", snaps=(("snapshot-9", datetime.now(UTC) - timedelta(seconds=460)),))
    fake, pub = FakeVCenter([busy, vm("idle")]), ListPublisher()
    sched = SiteScheduler(fake, pub, _settings())
    report = await sched.cycle()
    assert report.at_risk == [busy.vm.instance_uuid]
    assert fake.taken == [vm("idle").vm.instance_uuid]
    [event] = pub.schedule_events(ScheduleKind.RPO_AT_RISK)
    assert event.vm_snapshot == "snapshot-9" and event.policy == "gold"
    await sched.cycle()
    assert len(pub.schedule_events(ScheduleKind.RPO_AT_RISK)) == 1


async def test_memory_from_events_keeps_a_new_owner_from_snapshotting_twice_in_a_slot() -> None:
    fake, pub = FakeVCenter([vm("web-1")]), ListPublisher()
    first = SiteScheduler(fake, pub, _settings())
    await first.cycle()
    second = SiteScheduler(fake, ListPublisher(), _settings())
    for e in pub.events:
        second.remember_record(None, e.model_dump_json().encode())
    assert (await second.cycle()).taken == []
    assert len(fake.taken) == 1


async def test_policy_problems_stop_the_start_and_are_warnings_later(
        caplog: pytest.LogCaptureFixture) -> None:
    settings = ScheduleSettings(policies=(policy(folders=("/DC0/vm/nope", "/DC0/vm")),))
    sched = SiteScheduler(FakeVCenter([vm("web-1")]), ListPublisher(),
                          settings)
    with pytest.raises(ConfigError, match="policy 'gold': folder '/DC0/vm/nope' does not exist"):
        await sched.check()
    report = await sched.cycle()
    assert any("does not exist" in p for p in report.problems)
    assert "schedule policy problem" in caplog.text
