"""The audit of the control topics, pure parts (no broker, no database): which event a record
carries, its ``events`` row and its projection, the rebuild's reading of raw records, and the
``cbtstream audit schedule|fences`` parser and output."""

from __future__ import annotations

import argparse
import json
import re
import uuid
from datetime import UTC, datetime

import pytest

from cbtctl.cli import build_parser
from cbtctl.commands import audit as audit_cmd
from cbtctl.replay.audit import TABLES, to_events
from cbtctl.replay.reader import RawRecord, pipeline_stages
from cbtstream.config import Settings
from cbtstream.errors import ConfigError
from consumers.audit.decoding import audited_event
from consumers.audit.migrations import load_migrations
from consumers.audit.projection import EVENT_COLUMNS, PHASES, event_row, project
from schemas.codec import MAX_VALUE_BYTES, EventDecodeError, encode
from schemas.events import ScheduleKind
from schemas.topics import (
    ALL_TOPICS,
    AUDITED_TOPICS,
    CONTROL_TOPICS,
    DEADLETTER,
    FENCES,
    SCHEDULE_EVENTS,
    SNAPSHOT_TAKEN,
)
from tests.audit.control import VM_A, history
from tests.unit.factories import disk, snap


def test_audited_topics_are_the_disk_topics_and_the_control_topics() -> None:
    assert (*ALL_TOPICS, *CONTROL_TOPICS) == AUDITED_TOPICS
    assert FENCES not in ALL_TOPICS and SCHEDULE_EVENTS not in ALL_TOPICS  # replay unchanged
    [audit] = [s for s in pipeline_stages(Settings()) if s.name == "audit"]
    assert audit.inputs == AUDITED_TOPICS  # its lag counts the control topics too


def test_control_records_decode_and_a_fence_tombstone_is_nothing() -> None:
    reports, fences = history()
    for ev in (*reports, *fences):
        spec = SCHEDULE_EVENTS if ev in reports else FENCES
        key, value, _ = encode(ev)
        assert audited_event(spec, key, value) == ev
        assert audited_event(spec, b"another key", value) == ev  # read like the planner reads
    assert audited_event(FENCES, b"fence/x", None) is None
    with pytest.raises(EventDecodeError, match="tombstone"):
        audited_event(SCHEDULE_EVENTS, str(VM_A).encode(), None)  # only fences are compacted


@pytest.mark.parametrize(("spec", "value", "error"), [
    (FENCES, b"{}", r"invalid ChangeIdFence: .+ \(\d+ error\(s\)\)"),
    (FENCES, b"not json", "invalid ChangeIdFence"),
    (SCHEDULE_EVENTS, b'{"kind": "rpo_missed"}', "invalid ScheduleEvent"),
    (SCHEDULE_EVENTS, b"x" * (MAX_VALUE_BYTES + 1), "more than"),
])
def test_a_bad_control_record_is_a_one_line_decode_error(spec: object, value: bytes,
                                                         error: str) -> None:
    with pytest.raises(EventDecodeError, match=error) as caught:
        audited_event(spec, b"k", value)  # type: ignore[arg-type]
    assert "\n" not in str(caught.value)


def test_disk_topics_keep_their_checks_and_a_fence_is_not_a_disk_event() -> None:
    ev = snap(disk(2000), None)
    key, value, _ = encode(ev)
    assert audited_event(SNAPSHOT_TAKEN, key, value) == ev
    with pytest.raises(EventDecodeError, match="does not name"):
        audited_event(SNAPSHOT_TAKEN, b"other/disk-1", value)
    _, fence_value, _ = encode(history()[1][0])
    with pytest.raises(EventDecodeError):
        audited_event(SNAPSHOT_TAKEN, key, fence_value)
    with pytest.raises(EventDecodeError):
        audited_event(FENCES, key, value)  # a disk event on the fences topic


def test_events_rows_of_control_events_have_no_disk() -> None:
    reports, fences = history()
    row = dict(zip(EVENT_COLUMNS, event_row("cbt.schedule.events", 1, 7, reports[0]),
                   strict=True))
    assert (row["disk_key"], row["vm_instance_uuid"], row["sync_id"], row["vm_snapshot"]) == (
        None, VM_A, None, "snapshot-1")
    assert row["event_type"] == "ScheduleEvent" and json.loads(row["body"])["kind"] == (
        "snapshot_taken")
    row = dict(zip(EVENT_COLUMNS, event_row("cbt.changeid.fences", 0, 3, fences[0]),
                   strict=True))
    assert (row["disk_key"], row["vm_instance_uuid"], row["sync_id"], row["vm_snapshot"]) == (
        None, None, None, None)


def test_projection_of_control_events_one_insert_each_in_the_batch_phases() -> None:
    reports, fences = history()
    for ev, table in ((reports[4], "schedule_events"), (fences[2], "fence_events")):
        [stmt] = project(ev)
        assert stmt.sql in PHASES
        assert f"INSERT INTO {table}" in stmt.sql and "ON CONFLICT (event_id) DO NOTHING" in (
            stmt.sql)
        assert len(set(re.findall(r"\$\d+", stmt.sql))) == len(stmt.args)
        assert stmt.args[0] == ev.event_id
    assert project(reports[4]).pop().args[7] == "rpo_missed"
    assert project(fences[2]).pop().args[-1] is True  # the revoke


def test_migration_4_creates_the_control_tables_and_the_rebuild_compares_them() -> None:
    [last] = [m for m in load_migrations() if m.version == 4]
    assert last.name == "control_events"
    for table in ("schedule_events", "fence_events"):
        assert f"CREATE TABLE {table}" in last.sql and table in TABLES


def test_the_rebuild_reads_records_like_the_writer() -> None:
    reports, fences = history()

    def raw(spec: object, offset: int, key: bytes | None, value: bytes | None) -> RawRecord:
        return RawRecord(spec, spec.name, 0, offset, 0, key, value)  # type: ignore[arg-type,attr-defined]

    key, value, _ = encode(reports[0])
    fkey, fvalue, _ = encode(fences[0])
    raws = [raw(SCHEDULE_EVENTS, 0, key, value), raw(FENCES, 0, fkey, fvalue),
            raw(FENCES, 1, fkey, None), raw(SCHEDULE_EVENTS, 1, key, b"{}"),
            raw(DEADLETTER, 0, None, b"{}")]
    assert to_events(raws) == [("cbt.schedule.events", 0, 0, reports[0]),
                               ("cbt.changeid.fences", 0, 0, fences[0])]


# -- the command line ---------------------------------------------------------------------------
def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["audit", *argv])


def test_audit_alone_still_runs_the_consumer_and_listings_have_their_handlers() -> None:
    args = parse("--batch", "5", "--no-migrate")
    assert (args.handler, args.batch, args.no_migrate, args.view) == (
        audit_cmd.run, 5, True, None)
    args = parse("schedule", "--vm", "pgtest1", "--kind", "rpo_missed", "--kind",
                 "rpo_at_risk", "--since", "2026-11-01", "--json")
    assert args.handler is audit_cmd.run_schedule
    assert (args.vm, args.kind, args.json, args.limit) == (
        "pgtest1", ["rpo_missed", "rpo_at_risk"], True, None)
    args = parse("fences", "--current", "--limit", "3")
    assert (args.handler, args.current, args.limit, args.json) == (
        audit_cmd.run_fences, True, 3, False)
    for wrong in (("schedule", "--kind", "rpo_late"), ("fences", "--limit", "0"),
                  ("fences", "--limit", "x")):
        with pytest.raises(SystemExit):
            parse(*wrong)


def test_the_command_knows_every_schedule_kind() -> None:
    assert tuple(k.value for k in ScheduleKind) == audit_cmd.SCHEDULE_KINDS


def test_since_is_iso_8601_utc_without_zone() -> None:
    assert audit_cmd.parse_since(None) is None
    assert audit_cmd.parse_since("2026-11-01T02:00:00") == datetime(2026, 11, 1, 2, tzinfo=UTC)
    assert audit_cmd.parse_since("2026-11-01T02:00:00+02:00") == datetime(2026, 11, 1,
                                                                           tzinfo=UTC)
    with pytest.raises(ConfigError, match="ISO 8601"):
        audit_cmd.parse_since("yesterday")


def test_rows_as_json_lines_and_table_cells() -> None:
    fence_id = uuid.uuid4()
    at = datetime(2026, 11, 1, 1, 2, 3, 456000, tzinfo=UTC)
    row = {"event_id": fence_id, "occurred_at": at, "fence_id": fence_id, "scope": "vm",
           "target": None, "fenced_before": at, "reason": "KB", "revoked": True}
    obj = audit_cmd.row_json("fence", row)
    assert next(iter(obj)) == "type" and obj["type"] == "fence"
    assert obj["before"] == at.isoformat() and "fenced_before" not in obj
    assert obj["fence_id"] == str(fence_id) and obj["target"] is None
    assert json.loads(json.dumps(obj)) == obj
    [cells] = audit_cmd.table_rows([row], audit_cmd.FENCE_COLUMNS)
    assert cells == ["2026-11-01 01:02:03", str(fence_id), "vm", "-", "2026-11-01 01:02:03",
                     "yes", "KB"]
    [cells] = audit_cmd.table_rows([{"rpo_s": 3600.0, "kind": "rpo_missed"}], ("rpo_s", "kind"))
    assert cells == ["3600", "rpo_missed"]

