"""No input topic of the pipeline stops on a bad record.

Bad records of every kind (invalid JSON, wrong types, missing fields, a record keyed by another
disk than its body, an unknown event type, an oversized value, binary garbage, a tombstone) are
written as raw bytes to each input topic (planner: snapshot.taken, changeid.committed,
sync.failed; copier: sync.planned), interleaved with good events. Checked against the real worker
and a real (no-op) copier:

- every bad record is in cbt.deadletter exactly once, with headers original-topic/partition/
  offset/error and its original key and value kept byte for byte (a value too large for any
  dead letter is kept by size and sha256, header original-value-omitted);
- no good record is dead-lettered;
- the good events are processed: every disk is planned and committed twice (full, then
  incremental from its own change ID), and a good SyncFailed from the copier is applied to the
  table.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from cbtctl.demo.processes import Proc
from cbtstream.config import Settings
from cbtstream.kafka import Publisher, client_kwargs, topic_name
from schemas import DiskRef, SnapshotTaken
from schemas.codec import MAX_VALUE_BYTES, encode
from schemas.events import ChangeIdCommitted, SyncFailed, SyncPlanned
from schemas.topics import (
    CHANGEID_COMMITTED,
    DEADLETTER,
    SNAPSHOT_TAKEN,
    SYNC_FAILED,
    SYNC_PLANNED,
    TopicSpec,
)
from tests.support import read_topic

pytestmark = pytest.mark.integration

VM = "50d1e7e7-0000-4000-8000-00000000dead"
OTHER = "50d1e7e7-0000-4000-8000-00000000beef"
KEYS = (2000, 2001, 2002)
NO_CBT = 2003  # CBT off: the copier answers SyncFailed(cbt_not_enabled), a good sync.failed
INPUTS = (SNAPSHOT_TAKEN, CHANGEID_COMMITTED, SYNC_FAILED, SYNC_PLANNED)
#: Topics of this test accept records larger than the codec's limit, so an oversized record can
#: exist at all (brokers refuse > ~1 MiB by default).
BIG_TOPIC_BYTES = 4 * 1024 * 1024


def disk(key: int, vm: str = VM) -> DiskRef:
    return DiskRef(vm_instance_uuid=vm, vm_path="/DC/vm/dl", vm_name="dl", device_key=key,
                   backing_file=f"[ds] dl/dl_{key}.vmdk", capacity_bytes=1 << 20)


def change(key: int, seq: int) -> str:
    return f"52 00 00 00 00 00 00 00-00 00 00 00 00 00 {key % 256:02x} 00/{seq}"


def snap(key: int, seq: int) -> SnapshotTaken:
    return SnapshotTaken(disk=disk(key), vcenter="vc", vm_snapshot=f"snapshot-{seq}",
                         change_id=None if key == NO_CBT else change(key, seq),
                         taken_at=datetime(2026, 1, 1, 12, seq, tzinfo=UTC))


def sample(spec: TopicSpec) -> Any:
    """A valid event of the topic's type (the base of the malformed variants)."""
    import uuid

    d = disk(KEYS[0])
    if spec is SNAPSHOT_TAKEN:
        return snap(KEYS[0], 9)
    if spec is SYNC_PLANNED:
        return SyncPlanned(disk=d, sync_id=uuid.uuid4(), snapshot_event_id=uuid.uuid4(),
                           vm_snapshot="snapshot-9", replication_type="full",
                           reason="no_previous_commit", previous_change_id=None,
                           base_change_id=None, change_id=change(KEYS[0], 9))
    if spec is CHANGEID_COMMITTED:
        return ChangeIdCommitted(disk=d, sync_id=uuid.uuid4(), vm_snapshot="snapshot-9",
                                 previous_change_id=None, change_id=change(KEYS[0], 9),
                                 replication_type="full", reason="no_previous_commit",
                                 bytes_copied=0, extents=0, digest="sha256:0", duration_s=0)
    return SyncFailed(disk=d, reason="test", detail="x")


def bad_records(spec: TopicSpec) -> list[tuple[str, bytes | None, bytes | None]]:
    """(kind, key, value) of every malformed variant for one topic."""
    ev = sample(spec)
    key, value, _ = encode(ev)
    doc = json.loads(value)
    wrong_types = {**doc, "disk": {**doc["disk"], "capacity_bytes": "big", "device_key": "x"}}
    missing = {k: v for k, v in doc.items() if k != "disk"}
    unknown = {**doc, "event_type": "SnapshotDeleted"}
    other_key = f"{OTHER}/disk-2000".encode()
    big = json.dumps({**doc, "padding": "x" * MAX_VALUE_BYTES}).encode()
    return [
        ("invalid-json", key, b'{"event_type": "SnapshotTaken", "disk": '),
        ("wrong-types", key, json.dumps(wrong_types).encode()),
        ("missing-fields", key, json.dumps(missing).encode()),
        ("key-body-mismatch", other_key, value),
        ("unknown-event-type", key, json.dumps(unknown).encode()),
        ("oversized", key, big),
        ("binary-garbage", b"\xff\xfe\x00key", bytes(range(256)) * 4),
        ("tombstone", key, None),
        # Escaped as JSON it exceeds any dead letter: kept by size and sha256 only.
        ("huge", key, b"\x01" * (3 * 1024 * 1024)),
        ("not-an-object", None, b"[1, 2, 3]"),
    ]


async def _allow_big_records(settings: Settings) -> None:
    admin = AIOKafkaAdminClient(**client_kwargs(settings.kafka))
    await admin.start()
    try:
        # alter_configs replaces a topic's whole configuration: keep the catalogue's (the
        # worker refuses a topic whose retention or cleanup policy differs from it)
        await admin.alter_configs([
            ConfigResource(ConfigResourceType.TOPIC, topic_name(spec, settings.kafka),
                           configs={**spec.config, "max.message.bytes": str(BIG_TOPIC_BYTES)})
            for spec in INPUTS])
        # The broker applies topic configs asynchronously: wait until every topic reports it,
        # or the first large record can still be refused (MessageSizeTooLargeError).
        deadline = asyncio.get_running_loop().time() + 30
        while True:
            described = await admin.describe_configs([
                ConfigResource(ConfigResourceType.TOPIC, topic_name(spec, settings.kafka))
                for spec in INPUTS])
            values = [entry[1] for resp in described for res in resp.resources
                      for entry in res[4] if entry[0] == "max.message.bytes"]
            if len(values) == len(INPUTS) and set(values) == {str(BIG_TOPIC_BYTES)}:
                break
            assert asyncio.get_running_loop().time() < deadline, values
            await asyncio.sleep(0.2)
    finally:
        await admin.close()


def decode_kept(text: str | None, encoding: str) -> bytes | None:
    if text is None:
        return None
    return base64.b64decode(text) if encoding == "base64" else text.encode()


async def test_bad_records_go_to_deadletter_and_good_ones_are_processed(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    streams = kafka_settings.streams.model_copy(update={"remove_snapshots": False})
    settings = kafka_settings.model_copy(update={"streams": streams})
    await _allow_big_records(settings)
    worker = Proc(["worker"], settings, tmp_path / "worker.log")
    copier = Proc(["copier", "--noop"], settings, tmp_path / "copier.log")
    sent: dict[tuple[str, int, int], tuple[str, bytes | None, bytes | None]] = {}
    raw = AIOKafkaProducer(**client_kwargs(settings.kafka), max_request_size=BIG_TOPIC_BYTES,
                           acks="all")
    try:
        await raw.start()
        async with Publisher(settings.kafka) as pub:
            for seq in (1, 2):
                bads = {spec.name: bad_records(spec) for spec in INPUTS}
                for i in range(max(map(len, bads.values()))):
                    for spec in INPUTS:
                        if i < len(bads[spec.name]):
                            kind, k, v = bads[spec.name][i]
                            t = topic_name(spec, settings.kafka)
                            meta = await raw.send_and_wait(t, key=k, value=v)
                            sent[(t, meta.partition, meta.offset)] = (kind, k, v)
                    if i == 2:  # the good events, in the middle of the bad ones
                        for key in (*KEYS, NO_CBT):
                            await pub.publish(snap(key, seq))
                if seq == 1:  # cycle 2 must start from cycle 1's commits
                    await read_topic(settings, CHANGEID_COMMITTED, raw=True, watch=(worker,),
                                     until=lambda recs: sum(_good(r) for r in recs) >= 3)

            def cycle2_done(recs: list[Any]) -> bool:
                rows = {r.key: json.loads(r.value) for r in recs if r.value}
                return all(rows.get(f"{VM}/disk-{k}".encode(), {}).get("change_id")
                           == change(k, 2) for k in KEYS) and rows.get(
                    f"{VM}/disk-{NO_CBT}".encode(), {}).get("last_failure") == "cbt_not_enabled"

            changelog = f"{settings.kafka.topic_prefix}{settings.streams.app_id}-disks-changelog"
            recs = await read_topic(settings, changelog, raw=True, until=cycle2_done,
                                    watch=(worker, copier), timeout=60)
        letters = await read_topic(settings, DEADLETTER, raw=True, watch=(worker, copier),
                                   until=lambda recs: len(recs) >= len(sent), timeout=30)
        await asyncio.sleep(1.0)  # anything extra (a good record dead-lettered) shows up now
        letters = await read_topic(settings, DEADLETTER, raw=True,
                                   until=lambda recs: len(recs) >= len(sent), timeout=30)
    except BaseException:
        print(worker.output()[-6000:], copier.output()[-4000:])
        raise
    finally:
        await raw.stop()
        copier.stop()
        worker.stop()

    assert len(letters) == len(sent), "a good record was dead-lettered, or a bad one twice"
    seen = set()
    for r in letters:
        h = {k: v.decode() for k, v in r.headers}
        origin = (h["original-topic"], int(h["original-partition"]), int(h["original-offset"]))
        assert origin in sent, origin
        assert origin not in seen
        seen.add(origin)
        kind, key, value = sent[origin]
        body = json.loads(r.value)
        assert h["event-type"] == "DeadLetter" and h["error"], kind
        assert body["stage"] == ("copier" if origin[0].endswith("sync.planned") else "planner")
        assert (body["original_topic"], body["original_partition"], body["original_offset"]) \
            == origin
        if kind == "huge":
            assert value is not None and body["original_value"] is None
            digest = hashlib.sha256(value).hexdigest()
            assert h["original-value-omitted"] == f"{len(value)} bytes sha256:{digest}"
            assert digest in body["error"]
        else:
            kept = decode_kept(body["original_value"], body["original_value_encoding"])
            assert kept == value, kind
        assert decode_kept(body["original_key"], body["original_key_encoding"]) == key, kind
        assert r.key == key, kind
    kinds = {(t.rsplit(".", 2)[-2] + "." + t.rsplit(".", 1)[-1], kind)
             for (t, _, _), (kind, _, _) in sent.items()}
    assert len(kinds) == len(INPUTS) * 10

    rows = {r.key: json.loads(r.value) for r in recs if r.value}
    for k in KEYS:
        row = rows[f"{VM}/disk-{k}".encode()]
        assert row["commits"] == 2 and row["replication_type"] == "incremental", row
        assert row["running"] is None
    plans = await read_topic(settings, SYNC_PLANNED, raw=True,
                             until=lambda recs: sum(_good(r) for r in recs) >= 8)
    assert sum(_good(r) for r in plans) == 8  # 4 disks x 2 cycles, nothing else was planned


def _good(rec: Any) -> bool:
    """A record of this test's VM that decodes (the good ones)."""
    from schemas.codec import EventDecodeError, decode

    try:
        ev = decode(rec.value, key=rec.key)
    except EventDecodeError:
        return False
    return ev.disk.vm_instance_uuid == VM and not (
        isinstance(ev, ChangeIdCommitted) and ev.vm_snapshot == "snapshot-9")
