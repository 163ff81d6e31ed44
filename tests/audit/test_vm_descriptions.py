"""The audit of ``cbt.vm.described``: each VM snapshot's description from Kafka into
``vm_descriptions`` by the audit consumer (once, however often delivered), listed by
``cbtstream audit vms`` and rebuilt by ``replay --rebuild-audit``; and the pure parts."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid
from datetime import timedelta
from typing import Any

import pytest

from cbtctl.cli import build_parser
from cbtctl.commands import audit as audit_cmd
from cbtctl.demo.processes import child_env
from cbtctl.replay.audit import TABLES, rebuild_audit
from cbtstream.config import Settings
from cbtstream.kafka import Publisher, topic_name
from cbtstream.vsphere.adapter import SnapshotInfo, VmRef
from consumers.audit.migrations import load_migrations
from consumers.audit.projection import PHASES, project
from consumers.audit.repository import AuditRecord, AuditRepository
from producers.snapshot import vm_described
from schemas.events import VmDescribed
from schemas.topics import VM_DESCRIBED
from tests.audit.conftest import running_audit, wait_for
from tests.audit.control import NAMES, VM_A, VM_B
from tests.unit.factories import T0, vm_description

VCENTER = "vc1.example"


def described(vm: uuid.UUID, snapshot: int, *, cpus: int = 4,
              disks: tuple[int, ...] = (2000, 2001)) -> VmDescribed:
    """The description of ``vm`` at ``snapshot-<n>``, taken ``n`` x 15 min after T0."""
    name = NAMES[vm]
    at = T0 + timedelta(minutes=15 * snapshot)
    ref = VmRef(moref=f"vm-{snapshot}", name=name, instance_uuid=str(vm),
                path=f"/DC/vm/{name}")
    snap = SnapshotInfo(moref=f"snapshot-{snapshot}", name=f"cbtstream-{snapshot}", created=at,
                        vm=ref, quiesced=False, disks=[])
    ev = vm_described(VCENTER, snap, vm_description(str(vm), name, cpus=cpus, disks=disks))
    return ev.model_copy(update={"occurred_at": at + timedelta(seconds=3)})


def history() -> list[VmDescribed]:
    """VM A snapshotted three times (it grew from 4 to 8 CPUs and a third disk at the third),
    VM B once."""
    return [described(VM_A, 1), described(VM_B, 2), described(VM_A, 3),
            described(VM_A, 5, cpus=8, disks=(2000, 2001, 2002))]


def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cbtctl.cli", "audit", "vms", *args],
                          env=child_env(settings), capture_output=True, text=True, timeout=120,
                          check=False)


def json_lines(settings: Settings, *args: str) -> list[dict[str, Any]]:
    done = cli(settings, *args, "--json")
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


@pytest.mark.integration
async def test_vm_descriptions_are_stored_once_listed_and_rebuilt(
        audit_settings: Settings, repo: AuditRepository) -> None:
    events = history()
    k = audit_settings.kafka
    async with Publisher(k, linger_ms=20) as pub:
        for ev in events:
            await pub.publish(ev)
        await pub.publish(events[0])  # a snapshot's description published again: same id
        # not a VmDescribed: dead-lettered like on any other topic
        await pub.publish_raw(topic_name(VM_DESCRIBED, k), str(VM_A).encode(),
                              b'{"event_type": "VmDescribed"}', [])

    async def all_stored() -> bool:
        n = await repo.fetch("SELECT (SELECT count(*) FROM vm_descriptions) AS v, "
                             "(SELECT count(*) FROM events WHERE event_type = 'DeadLetter') AS d")
        return (n[0]["v"], n[0]["d"]) == (len(events), 1)

    async with running_audit(audit_settings) as consumer:
        await wait_for(all_stored, what="VM descriptions and one dead letter stored")
        assert consumer.stats.stored == len(events) + 1
        assert consumer.stats.dead_letters == 1

    # the raw log: one row per description, the VM and the snapshot named, no disk
    rows = await repo.fetch("SELECT event_id, disk_key, vm_instance_uuid, vm_snapshot, topic, "
                            "body FROM events WHERE event_type = 'VmDescribed' "
                            "ORDER BY occurred_at")
    assert [(r["disk_key"], r["vm_instance_uuid"], r["vm_snapshot"], r["topic"]) for r in rows
            ] == [(None, e.vm_instance_uuid, e.vm_snapshot, topic_name(VM_DESCRIBED, k))
                  for e in events]
    assert [VmDescribed.model_validate_json(r["body"]) for r in rows] == events

    # the projection: the facts as columns, the whole description as jsonb
    newest = (await repo.vm_descriptions(vm="pgtest1", latest=True))
    assert [(r["vm_snapshot"], r["num_cpus"], r["disks"], r["nics"], r["firmware"],
             r["memory_mib"], r["guest_id"], r["taken_at"]) for r in newest] == [
        ("snapshot-5", 8, 3, 1, "efi", 8192, "rhel9_64Guest", events[3].taken_at)]
    assert json.loads(newest[0]["description"]) == events[3].description.model_dump(mode="json")

    # applied again (a crash before the offset commit): nothing new, nothing changed
    before = await repo.fetch("SELECT * FROM vm_descriptions ORDER BY event_id")
    again = [AuditRecord(VM_DESCRIBED.name, 0, i, e) for i, e in enumerate(events)]
    assert await repo.apply(again) == 0
    assert await repo.fetch("SELECT * FROM vm_descriptions ORDER BY event_id") == before

    # `cbtstream audit vms`
    lines = json_lines(audit_settings)
    assert [(o["type"], o["event_id"]) for o in lines] == [  # oldest first
        ("vm", str(e.event_id)) for e in events]
    assert lines[0]["description"] == events[0].description.model_dump(mode="json")
    assert lines[0]["description"]["nics"][0]["mac_address"] == "00:50:56:01:02:03"
    for who in ("pgtest1", "PGTEST1", str(VM_A).upper(), "/DC/vm/pgtest1"):
        assert [o["vm_snapshot"] for o in json_lines(audit_settings, "--vm", who)] == [
            "snapshot-1", "snapshot-3", "snapshot-5"], who
    latest = json_lines(audit_settings, "--latest")
    assert {(o["vm_name"], o["vm_snapshot"]) for o in latest} == {
        ("pgtest1", "snapshot-5"), ("QCDev-Jump05", "snapshot-2")}
    [one] = json_lines(audit_settings, "--snapshot", "snapshot-3")
    assert one["event_id"] == str(events[2].event_id)
    assert len(json_lines(audit_settings, "--since", events[2].occurred_at.isoformat())) == 2
    [last] = json_lines(audit_settings, "--limit", "1")
    assert last["vm_snapshot"] == "snapshot-5"
    text = cli(audit_settings, "--vm", "qcdev-jump05")
    assert text.returncode == 0, text.stderr
    assert "VM descriptions (1)" in text.stdout and "rhel9_64Guest" in text.stdout
    assert "snapshot-2" in text.stdout and "efi" in text.stdout

    # `cbtstream replay --rebuild-audit`: the same rows rebuilt from the log
    cmp = await rebuild_audit(audit_settings)
    assert (cmp.audit_lag, cmp.differences) == (0, 0), cmp
    assert {t.table: t.rebuilt for t in cmp.tables}["vm_descriptions"] == len(events)


@pytest.mark.integration
async def test_listing_an_unmigrated_schema_says_how_to_migrate(
        audit_settings: Settings) -> None:
    done = cli(audit_settings)
    assert done.returncode == 1
    assert "no table vm_descriptions" in done.stderr and "cbtstream db migrate" in done.stderr


# -- pure parts ---------------------------------------------------------------------------------
def test_migration_5_creates_the_table_and_the_rebuild_compares_it() -> None:
    [m] = [m for m in load_migrations() if m.version == 5]
    assert m.name == "vm_descriptions" and "CREATE TABLE vm_descriptions" in m.sql
    assert TABLES["vm_descriptions"] == ("event_id",)


def test_one_insert_in_the_batch_phases_with_every_placeholder() -> None:
    [stmt] = project(described(VM_A, 1))
    assert stmt.sql in PHASES and "ON CONFLICT (event_id) DO NOTHING" in stmt.sql
    assert len(set(re.findall(r"\$\d+", stmt.sql))) == len(stmt.args)


def test_the_vms_listing_parses_and_prints_descriptions_as_objects() -> None:
    args = build_parser().parse_args(["audit", "vms", "--vm", "pgtest1", "--latest",
                                      "--snapshot", "snapshot-5", "--limit", "2", "--json"])
    assert args.handler is audit_cmd.run_vms
    assert (args.vm, args.latest, args.snapshot, args.limit, args.json) == (
        "pgtest1", True, "snapshot-5", 2, True)
    ev = described(VM_A, 1)
    row = {"event_id": ev.event_id, "taken_at": ev.taken_at, "vm_name": "pgtest1",
           "description": ev.description.model_dump_json()}
    obj = audit_cmd.row_json("vm", row)
    assert obj["description"] == ev.description.model_dump(mode="json")
    assert obj["taken_at"] == ev.taken_at.isoformat() and obj["event_id"] == str(ev.event_id)
    [cells] = audit_cmd.table_rows([row], audit_cmd.VM_COLUMNS[:3])
    assert cells == ["2026-11-01 00:15:00", "pgtest1", "-"]
