"""The site scheduler on the real simulator and broker (issue 21 item 1): a policy by folder,
name pattern and tag picks up a VM created between cycles; a VM whose previous snapshot is
still present is skipped with rpo_at_risk (then rpo_missed); two schedulers in one group
snapshot each VM once per slot; a bad policy stops ``cbtstream schedule`` with exit 2."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from cbtctl.commands.schedule import group_id
from cbtstream.config import ScheduleSettings, Settings, VSphereSettings
from cbtstream.kafka import Publisher, topic_name
from cbtstream.membership import KeyOwnership, partition_of
from cbtstream.vsphere.adapter import VSphereClient
from cbtstream.vsphere.simctl import SimulatorControl
from cbtstream.vsphere.tags import TagClient
from producers.site import SiteScheduler
from schemas.events import ScheduleEvent, ScheduleKind
from schemas.topics import SCHEDULE_EVENTS
from tests.support import read_topic, settings_env

pytestmark = pytest.mark.integration
MiB = 1 << 20


def _admin_folder(client: VSphereClient, name: str, vm_morefs: list[str]) -> str:
    """Create ``/DC0/vm/<name>`` and move VMs into it (blocking; the test plays the
    administrator through the adapter's own session)."""
    si: Any = client._si
    dc = si.content.rootFolder.childEntity[0]
    folder = dc.vmFolder.CreateFolder(name)
    vms = [v for v in dc.vmFolder.childEntity if getattr(v, "_moId", None) in vm_morefs]
    task = folder.MoveIntoFolder_Task(vms)
    while task.info.state not in ("success", "error"):
        time.sleep(0.02)
    return f"/DC0/vm/{name}"


def _tag(vsettings: VSphereSettings, category: str, tag: str, vm_moref: str) -> None:
    """Create a category and a tag and attach the tag to a VM through the vAPI REST."""
    client = TagClient(vsettings)
    token = client._request("POST", "/rest/com/vmware/cis/session")
    cat = client._request("POST", "/rest/com/vmware/cis/tagging/category", token, {
        "create_spec": {"name": category, "description": "", "cardinality": "MULTIPLE",
                        "associable_types": []}})
    tid = client._request("POST", "/rest/com/vmware/cis/tagging/tag", token, {
        "create_spec": {"name": tag, "description": "", "category_id": cat}})
    client._request("POST", f"/rest/com/vmware/cis/tagging/tag-association/id:{tid}"
                    "?~action=attach", token, {"object_id": {"id": vm_moref,
                                                             "type": "VirtualMachine"}})


def _schedule(**policy: Any) -> ScheduleSettings:
    return ScheduleSettings(policies=({"name": "gold", **policy},),  # type: ignore[arg-type]
                            metrics_port=0)


async def test_policies_by_folder_pattern_and_tag_pick_up_new_vms(
        producer_settings: Settings, sim: SimulatorControl, vsphere_settings: VSphereSettings,
        client: VSphereClient) -> None:
    run = uuid.uuid4().hex[:6]
    a = sim.create_vm(f"sch-{run}-a", [MiB], cbt=True)
    t = sim.create_vm(f"tag-{run}", [MiB], cbt=True)
    folder = await asyncio.to_thread(_admin_folder, client, f"f-{run}", [a.moref])
    vsettings = vsphere_settings
    await asyncio.to_thread(_tag, vsettings, f"cat-{run}", "gold", t.moref)
    members = await TagClient(vsettings).members([f"cat-{run}/gold", "nope"])
    assert members.vms == {f"cat-{run}/gold": frozenset({t.moref})}
    assert members.missing == ("nope",)
    settings = ScheduleSettings(metrics_port=0, policies=(  # type: ignore[arg-type]
        {"name": "by-folder", "rpo_s": 600, "folders": [folder]},
        {"name": "by-name", "rpo_s": 600, "names": [f"sch-{run}-*"]},
        {"name": "by-tag", "rpo_s": 600, "tags": [f"cat-{run}/gold"]}))
    async with Publisher(producer_settings.kafka) as pub:
        sched = SiteScheduler(client, pub, settings, tags=TagClient(vsettings))
        res = await sched.check()
        assert {x.vm.vm.name: x.policy.name for x in res.assignments.values()} == {
            a.name: "by-folder", t.name: "by-tag"}
        first = await sched.cycle()
        assert set(first.taken) == {a.instance_uuid, t.instance_uuid}
        b = sim.create_vm(f"sch-{run}-b", [MiB], cbt=True)  # between two cycles
        second = await sched.cycle()
        assert second.taken == [b.instance_uuid] and second.problems == []
    events = await read_topic(producer_settings, SCHEDULE_EVENTS, raw=True,
                              until=lambda e: len(e) >= 3)
    assert Counter(json.loads(r.value)["kind"] for r in events) == {"snapshot_taken": 3}


async def test_a_vm_still_being_copied_is_at_risk_then_missed(
        producer_settings: Settings, sim: SimulatorControl, client: VSphereClient) -> None:
    vm = sim.create_vm(f"risk-{uuid.uuid4().hex[:6]}", [MiB], cbt=True)
    # every 1 s, RPO 2 s: no worker removes the snapshot, so it stays "being copied"
    settings = _schedule(rpo_s=2, every_s=1, names=[vm.name])
    async with Publisher(producer_settings.kafka) as pub:
        sched = SiteScheduler(client, pub, settings)
        assert (await sched.cycle()).taken == [vm.instance_uuid]
        await asyncio.sleep(1.1)
        second = await sched.cycle()
        assert second.taken == [] and second.at_risk == [vm.instance_uuid]
        await asyncio.sleep(1.5)
        third = await sched.cycle()
        assert third.taken == [] and third.missed == [vm.instance_uuid]
    snaps = [s for v in (await client.inventory()).vms if v.vm.moref == vm.moref
             for s in v.snapshots]
    assert len(snaps) == 1  # never a second snapshot beside the one being copied
    kinds = [ScheduleEvent.model_validate_json(r.value).kind for r in await read_topic(
        producer_settings, SCHEDULE_EVENTS, raw=True, until=lambda e: len(e) >= 3)]
    assert kinds == [ScheduleKind.SNAPSHOT_TAKEN, ScheduleKind.RPO_AT_RISK,
                     ScheduleKind.RPO_MISSED]


async def test_two_schedulers_snapshot_each_vm_once_per_slot(
        producer_settings: Settings, sim: SimulatorControl,
        vsphere_settings: VSphereSettings) -> None:
    """Two members of one group each snapshot their share; when one leaves, the other takes
    its partitions, reads its events back and snapshots nothing more in the slot."""
    run = uuid.uuid4().hex[:6]
    vms = [sim.create_vm(f"two-{run}-{i}", [MiB], cbt=True) for i in range(8)]
    settings = _schedule(rpo_s=3600, names=[f"two-{run}-*"])
    topic = topic_name(SCHEDULE_EVENTS, producer_settings.kafka)
    first: dict[int, Any] = {}
    both_done, left = asyncio.Event(), asyncio.Event()
    takeover: list[Any] = []

    async def member(n: int) -> None:
        async with VSphereClient(vsphere_settings) as c, Publisher(producer_settings.kafka) as p:
            own: KeyOwnership | None = None
            sched = SiteScheduler(c, p, settings, owns=lambda k: own is not None and own.owns(k))
            own = KeyOwnership(producer_settings.kafka, topic,
                               group_id(producer_settings.kafka.topic_prefix, c.vcenter),
                               lookback_s=3600, on_record=sched.remember_record,
                               on_revoke=sched.release, session_timeout_s=6)
            async with own:
                deadline = time.monotonic() + 30
                while len(own.ready_partitions()) != 1:  # the group settled on two members
                    assert time.monotonic() < deadline, "no one-partition assignment"
                    await asyncio.sleep(0.1)
                first[n] = await sched.cycle()
                if len(first) == 2:
                    both_done.set()
                await both_done.wait()
                if n == 0:
                    return  # leaves the group: member 1 takes its partition
                await left.wait()
                while len(own.ready_partitions()) != 2:
                    assert time.monotonic() < deadline + 30, "no takeover"
                    await asyncio.sleep(0.1)
                takeover.append(await sched.cycle())

    tasks = [asyncio.create_task(member(n)) for n in range(2)]
    await tasks[0]
    left.set()
    await tasks[1]
    taken = Counter(u for r in (*first.values(), *takeover) for u in r.taken)
    assert taken == Counter({v.instance_uuid: 1 for v in vms})
    split = Counter(partition_of(v.instance_uuid, own_partitions := 2) for v in vms)
    assert producer_settings.kafka.partitions == own_partitions
    assert sorted(r.owned for r in first.values()) == sorted(
        split.get(p, 0) for p in range(own_partitions))  # each owned its partition's VMs
    assert takeover[0].owned == 8 and takeover[0].taken == []  # memory read back


def test_a_bad_policy_stops_the_start_with_exit_2(producer_settings: Settings,
                                                  tmp_path: Path) -> None:
    env = settings_env(producer_settings)
    env["CBTSTREAM_SCHEDULE__POLICIES"] = json.dumps([
        {"name": "prod", "rpo_s": 900, "folders": ["/DC0/vm/no-such-folder"]}])
    proc = subprocess.run([sys.executable, "-m", "cbtctl.cli", "schedule", "--check"],
                          env=env, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "policy 'prod': folder '/DC0/vm/no-such-folder' does not exist" in proc.stderr
    assert "policy 'prod' matches no VM" in proc.stderr
