"""The audit of the control topics on the real stack: the scheduler's events and the change-ID
fences (a revoke, a tombstone, records delivered twice, a broken record) from Kafka into
PostgreSQL by the audit consumer, then listed by ``cbtstream audit schedule|fences``."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from cbtctl.demo.processes import child_env
from cbtctl.replay.audit import rebuild_audit
from cbtctl.replay.reader import consumer_lag, pipeline_stages
from cbtstream.config import Settings
from cbtstream.kafka import Publisher, topic_name
from consumers.audit.repository import AuditRecord, AuditRepository
from schemas.events import ChangeIdFence, DeadLetter, ScheduleEvent
from schemas.topics import FENCES, SCHEDULE_EVENTS, topic_for
from tests.audit.conftest import running_audit, wait_for
from tests.audit.control import VM_A, VM_B, history

pytestmark = pytest.mark.integration


def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cbtctl.cli", "audit", *args],
                          env=child_env(settings), capture_output=True, text=True, timeout=120,
                          check=False)


def json_lines(settings: Settings, *args: str) -> list[dict[str, Any]]:
    done = cli(settings, *args, "--json")
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


async def _caught_up(settings: Settings) -> bool:
    """The audit group committed every record of its topics (control topics included)."""
    stage = tuple(s for s in pipeline_stages(settings) if s.name == "audit")
    [lag] = await consumer_lag(settings.kafka, stage)
    return lag.started and lag.lag == 0


async def test_schedule_events_and_fences_are_stored_once_and_listed(
        audit_settings: Settings, repo: AuditRepository) -> None:
    reports, fences = history()
    k = audit_settings.kafka
    async with Publisher(k, linger_ms=20) as pub:
        for ev in (*reports, *fences):
            await pub.publish(ev)
        # compaction's way of forgetting a fence: not an event, skipped (not dead-lettered)
        await pub.publish_raw(topic_name(FENCES, k), fences[0].key.encode(),
                              None, [])  # type: ignore[arg-type]
        # a record that is not a ScheduleEvent: dead-lettered, like on any other topic
        await pub.publish_raw(topic_name(SCHEDULE_EVENTS, k), str(VM_A).encode(),
                              b'{"event_type": "ScheduleEvent"}', [])
        for ev in (*reports, *fences):  # the same records delivered again
            await pub.publish(ev)

    async def all_stored() -> bool:
        n = await repo.fetch("SELECT (SELECT count(*) FROM schedule_events) AS s, "
                             "(SELECT count(*) FROM fence_events) AS f, "
                             "(SELECT count(*) FROM events WHERE event_type = 'DeadLetter') AS d")
        return (n[0]["s"], n[0]["f"], n[0]["d"]) == (len(reports), len(fences), 1)

    async with running_audit(audit_settings) as consumer:
        await wait_for(all_stored, what="schedule events, fences and one dead letter stored")
        await wait_for(lambda: _caught_up(audit_settings), what="audit lag 0")
        stats = consumer.stats
        assert stats.dead_letters == 1  # the broken record only, not the tombstone
        assert stats.records == 2 * (len(reports) + len(fences)) + 2 + 1  # + its dead letter
        assert stats.stored == len(reports) + len(fences) + 1

    # the raw log: one row per event, no disk
    rows = await repo.fetch("SELECT event_id, event_type, disk_key, vm_instance_uuid, topic, "
                            "body FROM events WHERE event_type <> 'DeadLetter'")
    assert len(rows) == len(reports) + len(fences)
    by_id = {e.event_id: e for e in (*reports, *fences)}
    for r in rows:
        ev = by_id[r["event_id"]]
        assert r["disk_key"] is None and r["topic"] == topic_name(topic_for(ev), k)
        assert r["vm_instance_uuid"] == (ev.vm_instance_uuid if isinstance(ev, ScheduleEvent)
                                         else None)
        assert type(ev).model_validate_json(r["body"]) == ev
    [letter] = await repo.fetch("SELECT body FROM events WHERE event_type = 'DeadLetter'")
    dead = DeadLetter.model_validate_json(letter["body"])
    assert (dead.original_topic, dead.stage) == (topic_name(SCHEDULE_EVENTS, k), "audit")

    # the projections
    missed = await repo.fetch("SELECT vm_instance_uuid, vm_name, policy, rpo_s, cycle_at, "
                              "point_at, vm_snapshot FROM schedule_events "
                              "WHERE kind = 'rpo_missed' ORDER BY vm_name")
    assert [(r["vm_instance_uuid"], r["vm_name"], r["vm_snapshot"]) for r in missed] == [
        (VM_B, "QCDev-Jump05", None), (VM_A, "pgtest1", "snapshot-1")]
    assert {(r["policy"], r["rpo_s"], r["point_at"]) for r in missed} == {
        ("gold", 3600.0, reports[4].point_at)}
    [failed] = await repo.fetch("SELECT reason, detail FROM schedule_events "
                                "WHERE kind = 'snapshot_failed'")
    assert dict(failed) == {"reason": "vsphere_timeout", "detail": "CreateSnapshot_Task timed out"}
    current = await repo.fence_events(current=True)
    assert {(r["target"], r["revoked"]) for r in current} == {(str(VM_A), True),
                                                              ("esx1.example", False)}

    # a batch applied again (a crash before the offset commit): nothing new, nothing changed
    before = await repo.fetch("SELECT * FROM fence_events ORDER BY event_id")
    again = [AuditRecord(topic_for(e).name, 0, i, e) for i, e in enumerate((*reports, *fences))]
    assert await repo.apply(again) == 0
    assert await repo.fetch("SELECT * FROM fence_events ORDER BY event_id") == before

    # `cbtstream audit schedule`
    lines = json_lines(audit_settings, "schedule", "--kind", "rpo_missed")
    assert sorted((o["type"], o["vm_name"], o["vm_instance_uuid"], o["kind"], o["point_at"])
                  for o in lines) == [
        ("schedule", name, str(vm), "rpo_missed", reports[4].point_at.isoformat())  # type: ignore[union-attr]
        for name, vm in (("QCDev-Jump05", VM_B), ("pgtest1", VM_A))]
    everything = json_lines(audit_settings, "schedule")
    assert [o["event_id"] for o in everything] == [  # oldest first (then by event id)
        str(e.event_id) for e in sorted(reports, key=lambda e: (e.occurred_at, e.event_id))]
    for who in ("pgtest1", "PGTEST1", str(VM_A).upper(), "/DC/vm/pgtest1"):
        assert [o["kind"] for o in json_lines(audit_settings, "schedule", "--vm", who)] == [
            "snapshot_taken", "rpo_at_risk", "rpo_missed"], who
    since = reports[3].occurred_at.isoformat()
    assert len(json_lines(audit_settings, "schedule", "--since", since)) == 4
    [newest] = json_lines(audit_settings, "schedule", "--limit", "1")
    assert newest["event_id"] == str(max(reports[-2:], key=lambda e: e.event_id).event_id)
    text = cli(audit_settings, "schedule", "--kind", "snapshot_failed")
    assert text.returncode == 0 and "snapshot_failed" in text.stdout, text.stderr
    assert "vsphere_timeout" in text.stdout and "Schedule events (1)" in text.stdout

    # `cbtstream audit fences`
    lines = json_lines(audit_settings, "fences")
    assert [(o["type"], o["event_id"], o["revoked"]) for o in lines] == [
        ("fence", str(f.event_id), f.revoked) for f in fences]
    assert ChangeIdFence.model_validate({k: v for k, v in lines[0].items() if k != "type"}
                                        | {"schema_version": 1, "event_type": "ChangeIdFence"}
                                        ) == fences[0]
    lines = json_lines(audit_settings, "fences", "--current")
    assert {(o["fence_id"], o["revoked"]) for o in lines} == {
        (str(fences[0].fence_id), True), (str(fences[1].fence_id), False)}
    lines = json_lines(audit_settings, "fences", "--fence", str(fences[0].fence_id))
    assert [o["revoked"] for o in lines] == [False, True]
    text = cli(audit_settings, "fences", "--current")
    assert text.returncode == 0 and "esx1.example" in text.stdout, text.stderr

    # `cbtstream replay --rebuild-audit`: the same rows rebuilt from the log (the tombstone and
    # the broken record read as the writer read them)
    cmp = await rebuild_audit(audit_settings)
    assert (cmp.audit_lag, cmp.differences) == (0, 0), cmp
    rebuilt = {t.table: t.rebuilt for t in cmp.tables}
    assert (rebuilt["schedule_events"], rebuilt["fence_events"]) == (len(reports), len(fences))


async def test_listing_an_unmigrated_schema_says_how_to_migrate(
        audit_settings: Settings) -> None:
    done = cli(audit_settings, "fences")  # the test's schema exists, nothing migrated
    assert done.returncode == 1
    assert "no table fence_events" in done.stderr and "cbtstream db migrate" in done.stderr
