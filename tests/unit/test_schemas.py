"""Event models, change IDs, disk keys, the wire codec and the committed JSON Schemas."""

from __future__ import annotations

import json
from datetime import datetime

import pytest
from pydantic import ValidationError

from schemas import (
    ChangeId,
    ChangeIdError,
    DiskRef,
    SnapshotTaken,
    SyncPlanned,
    SyncProgress,
    parse_disk_key,
)
from schemas.codec import EventDecodeError, dead_letter_record, decode, encode
from schemas.jsonschema import drift, render_all
from schemas.topics import ALL_TOPICS, CONTROL_TOPICS, topic_for
from tests.unit.factories import EPOCH_A, VM, disk, new_id, snap


def test_committed_json_schemas_match_the_models() -> None:
    assert drift() == [], "run `cbtstream schemas generate` and commit schemas/json"


def test_every_event_type_has_a_schema_and_a_topic() -> None:
    names = render_all()
    # 16 event types (VmDescribed, ReplicationHold and CutoverCompleted among them), the 2
    # request bodies of the change-ID API and the VM description
    assert len(names) == 19
    assert {"vm_description.schema.json", "vm_described.schema.json",
            "replication_hold.schema.json", "cutover_completed.schema.json"} <= set(names)
    assert {"store_change_id_request.schema.json", "disk_commit_request.schema.json"} <= set(names)
    for spec in (*ALL_TOPICS, *CONTROL_TOPICS):
        for model in spec.value_types:
            assert any(model.__name__.lower() in n.replace("_", "") for n in names)


@pytest.mark.parametrize(
    ("text", "epoch", "seq"),
    [(f"{EPOCH_A}/2", EPOCH_A, 2), ("52 aa/0", "52 aa", 0), ("ab-cd/123456", "ab-cd", 123456)],
)
def test_change_id_parses(text: str, epoch: str, seq: int) -> None:
    cid = ChangeId.parse(text)
    assert (cid.epoch, cid.sequence) == (epoch, seq)
    assert str(cid) == text


@pytest.mark.parametrize(
    "text", ["*", "", "/", "52 aa/", "/3", "52 aa/-1", "52 aa/x", "zz/1", "../../etc/passwd",
             "52 aa/1 ", "a" * 200 + "/1", "52 aa/١"],
)
def test_malformed_change_ids_are_rejected(text: str) -> None:
    with pytest.raises(ChangeIdError):
        ChangeId.parse(text)


def test_epoch_comparison_ignores_separators_and_case() -> None:
    a = ChangeId.parse("52 8A b4/1")
    assert a.same_epoch(ChangeId.parse("528ab4/7"))
    assert not a.same_epoch(ChangeId.parse("52 8a b5/1"))


def test_disk_key_and_id() -> None:
    d = disk(204)
    assert d.key == f"{VM}/disk-204" and d.disk_id == "disk-204"
    assert parse_disk_key(d.key) == (VM, 204)
    for bad in ["x", f"{VM}/disk-", f"{VM}/disk-1/..", f"{VM}:disk-1", "../disk-1"]:
        with pytest.raises(ValueError):
            parse_disk_key(bad)


def test_disk_id_must_match_device_key() -> None:
    with pytest.raises(ValidationError):
        DiskRef(vm_instance_uuid=VM, vm_path="/a", vm_name="a", device_key=2000,
                disk_id="disk-2001", backing_file="f", capacity_bytes=1)


def test_timestamps_must_be_timezone_aware() -> None:
    with pytest.raises(ValidationError):
        SnapshotTaken(disk=disk(), vcenter="v", vm_snapshot="s", change_id=None,
                      taken_at=datetime(2026, 1, 1))


def test_codec_round_trip_single_line_with_headers() -> None:
    ev = snap(disk(), f"{EPOCH_A}/3")
    key, value, headers = encode(ev)
    assert key == ev.key.encode()
    assert b"\n" not in value
    assert dict(headers)["event-type"] == b"SnapshotTaken"
    assert decode(value, key=key) == ev


def test_sync_progress_is_running_or_queued_with_its_place() -> None:
    base = {"disk": disk(), "sync_id": new_id(), "bytes_done": 0, "bytes_total": 0,
            "rate_bytes_per_s": 0.0}
    assert SyncProgress.model_validate(base).state == "running"
    queued = SyncProgress.model_validate({**base, "state": "queued", "queue_position": 2})
    key, value, _ = encode(queued)
    assert decode(value, key=key) == queued
    for wrong in ({"state": "queued"}, {"queue_position": 1},
                  {"state": "queued", "queue_position": 0}, {"state": "waiting"}):
        with pytest.raises(ValidationError):
            SyncProgress.model_validate({**base, **wrong})


def test_codec_refuses_key_naming_another_disk() -> None:
    """A record keyed by disk-2000 carrying disk-2001's body is the seed's bug: refuse it."""
    ev = snap(disk(2001), f"{EPOCH_A}/3")
    _, value, _ = encode(ev)
    with pytest.raises(EventDecodeError, match="does not name"):
        decode(value, key=f"{VM}/disk-2000".encode())


@pytest.mark.parametrize(
    "value",
    [None, b"", b"\xff\xfe", b"[]", b'{"event_type": "Nope"}', b'{"event_type": "DeadLetter"}',
     b'{"event_type": "SnapshotTaken"}', b"x" * (1024 * 1024 + 1)],
)
def test_codec_rejects_garbage(value: bytes | None) -> None:
    with pytest.raises(EventDecodeError):
        decode(value)


def test_codec_can_restrict_event_types() -> None:
    _, value, _ = encode(snap(disk(), None))
    with pytest.raises(EventDecodeError, match="not expected"):
        decode(value, expect=(SyncPlanned,))
    assert topic_for(snap(disk(), None)).name == "cbt.snapshot.taken"


def test_dead_letter_keeps_binary_input_losslessly() -> None:
    key, value, headers = dead_letter_record("t", 3, 42, b"\xff", b"\x00\xffbin", "bad", "x")
    doc = json.loads(value)
    assert doc["original_value_encoding"] == "base64"
    assert doc["original_key_encoding"] == "base64"
    assert key == b"\xff"
    h = dict(headers)
    assert h["original-offset"] == b"42" and h["original-topic"] == b"t"
