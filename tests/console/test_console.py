"""docs/console.md, run verbatim: every block marked ``console-test`` is executed with bash against
the real broker (kcat, and Kafka's own console tools from the stack's classpath), on this test's
own topic prefix, and its effect or output is checked."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import OffsetAndMetadata

from cbtstream.config import Settings
from cbtstream.kafka import Publisher, client_kwargs, topic_name
from schemas.codec import decode
from schemas.events import ChangeIdCommitted, FullReason, ReplicationType, SnapshotTaken
from schemas.topics import CHANGEID_COMMITTED, SNAPSHOT_TAKEN
from tests.support import read_topic
from tests.unit.factories import EPOCH_A, disk

DOC = Path(__file__).resolve().parents[2] / "docs" / "console.md"
_BLOCK = re.compile(r"<!-- console-test: (?P<name>[\w-]+) -->\n```sh\n(?P<body>.*?)```", re.S)


def blocks() -> dict[str, str]:
    return {m["name"]: m["body"] for m in _BLOCK.finditer(DOC.read_text())}


def run_block(settings: Settings, name: str, *, replace: tuple[str, str] | None = None) -> str:
    body = blocks()[name]
    if replace is not None:
        assert replace[0] in body
        body = body.replace(*replace)
    env = {**os.environ, "BOOTSTRAP": settings.kafka.bootstrap_servers,
           "P": settings.kafka.topic_prefix,
           "PATH": f"{settings.stack.dir.resolve() / 'bin'}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", body], env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, f"{name} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


async def sh(settings: Settings, name: str, **kw: tuple[str, str]) -> str:
    return await asyncio.to_thread(run_block, settings, name, **kw)


def test_every_documented_block_is_tested() -> None:
    assert set(blocks()) == {"produce-kcat", "produce-console", "tail-kcat", "tail-console",
                             "tail-jq", "topics", "reset-group"}


@pytest.mark.integration
async def test_publish_snapshot_taken_by_hand(kafka_settings: Settings) -> None:
    await sh(kafka_settings, "produce-kcat")
    await sh(kafka_settings, "produce-console")
    recs = await read_topic(kafka_settings, SNAPSHOT_TAKEN, raw=True, timeout=30,
                            until=lambda rs: len(rs) >= 2)
    by_key = {r.key.decode(): r for r in recs}
    assert set(by_key) == {f"5012abcd-1111-2222-3333-444455556666/disk-{k}" for k in (2000, 2001)}
    for key, r in by_key.items():
        ev = decode(r.value, key=r.key)  # valid, and the key names the body's disk
        assert isinstance(ev, SnapshotTaken) and ev.key == key
        assert dict(r.headers) == {"event-type": b"SnapshotTaken", "schema-version": b"1",
                                   "content-type": b"application/json"}
    # both tools put a disk's records in the partition the pipeline uses for that disk
    async with Publisher(kafka_settings.kafka) as pub:
        for key, r in by_key.items():
            ev = decode(r.value, key=r.key)
            part, _ = await pub.publish(ev.model_copy(update={"event_id": uuid.uuid4()}))
            assert part == r.partition, key


def _commit(device_key: int, seq: int) -> ChangeIdCommitted:
    return ChangeIdCommitted(
        disk=disk(device_key), sync_id=uuid.uuid4(), vm_snapshot="snapshot-7",
        previous_change_id=None, change_id=f"{EPOCH_A}/{seq}",
        replication_type=ReplicationType.FULL, reason=FullReason.NO_PREVIOUS_COMMIT,
        bytes_copied=4096, extents=1, digest="sha256:ab", duration_s=0.5)


@pytest.mark.integration
async def test_tail_committed_with_keys_headers_timestamps(kafka_settings: Settings) -> None:
    commits = [_commit(2000, 1), _commit(2001, 2)]
    async with Publisher(kafka_settings.kafka) as pub:
        where = [await pub.publish(c) for c in commits]
    recs = await read_topic(kafka_settings, CHANGEID_COMMITTED, raw=True, timeout=30,
                            until=lambda rs: len(rs) >= 2)
    stamp = {(r.partition, r.offset): r.timestamp for r in recs}
    topic = topic_name(CHANGEID_COMMITTED, kafka_settings.kafka)

    out = await sh(kafka_settings, "tail-kcat")
    for c, (p, o) in zip(commits, where, strict=True):
        assert (f"ts={stamp[(p, o)]} {topic}/{p}@{o} key={c.key} headers=event-type="
                "ChangeIdCommitted,schema-version=1,content-type=application/json") in out
        assert c.model_dump_json() in out

    out = await sh(kafka_settings, "tail-console")
    lines = out.splitlines()
    assert len(lines) == 2
    for c, (p, o) in zip(commits, where, strict=True):
        [line] = [ln for ln in lines if f"Partition:{p}\tOffset:{o}\t" in ln]
        assert line.startswith(f"CreateTime:{stamp[(p, o)]}\t")
        assert ("event-type:ChangeIdCommitted,schema-version:1,content-type:application/json\t"
                f"{c.key}\t{c.model_dump_json()}") in line

    out = await sh(kafka_settings, "tail-jq")
    assert sorted(out.splitlines()) == sorted(
        f"pgtest1\t{c.disk.disk_id}\tfull\tno_previous_commit\t{c.change_id}" for c in commits)

    out = await sh(kafka_settings, "topics")
    assert f"Topic: {topic}\t" in out and "PartitionCount: 2" in out
    assert "retention.ms=-1" in out


@pytest.mark.integration
async def test_reset_group_to_a_datetime(kafka_settings: Settings) -> None:
    k = kafka_settings.kafka
    async with Publisher(k) as pub:
        first = [await pub.publish(_commit(2000 + i, 1)) for i in range(3)]
        await asyncio.sleep(1.1)
        since = datetime.now(UTC)
        await asyncio.sleep(0.1)
        later = [await pub.publish(_commit(2000 + i, 2)) for i in range(3)]
    assert first and later
    group = f"{k.topic_prefix}cbtstream-audit"
    topic = topic_name(CHANGEID_COMMITTED, k)
    # an audit writer that read everything, then stopped (no active member)
    c = AIOKafkaConsumer(**client_kwargs(k), group_id=group, enable_auto_commit=False)
    await c.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(k.partitions)]
        c.assign(tps)
        end = await c.end_offsets(tps)
        await c.commit({tp: OffsetAndMetadata(end[tp], "") for tp in tps})
        expected = await c.offsets_for_times({tp: int(since.timestamp() * 1000) for tp in tps})
    finally:
        await c.stop()
    stamp = since.strftime("%Y-%m-%dT%H:%M:%S.") + f"{since.microsecond // 1000:03d}Z"
    out = await sh(kafka_settings, "reset-group",
                   replace=("SINCE=2026-11-01T00:00:00.000Z", f"SINCE={stamp}"))
    assert group in out
    c = AIOKafkaConsumer(**client_kwargs(k), group_id=group, enable_auto_commit=False)
    await c.start()
    try:
        for tp in tps:
            want = expected[tp].offset if expected[tp] is not None else end[tp]
            assert await c.committed(tp) == want, tp
    finally:
        await c.stop()
    assert any(expected[tp] is not None and expected[tp].offset < end[tp] for tp in tps)
