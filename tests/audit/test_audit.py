"""The audit trail against the real PostgreSQL and Kafka: seed queries, idempotency, refused
commits, dead letters, PostgreSQL outages, throughput."""

from __future__ import annotations

import random
import time

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from cbtctl.demo import seed
from cbtstream.config import Settings
from cbtstream.kafka import Publisher, client_kwargs, topic_name
from consumers.audit.repository import AuditRecord, AuditRepository, rebuild
from schemas.codec import decode, encode
from schemas.events import DeadLetter, Event, SyncFailed, SyncProgress
from schemas.topics import ALL_TOPICS, DEADLETTER, SYNC_PLANNED, topic_for
from tests.audit.conftest import PgProxy, dump, publish, running_audit, wait_for
from tests.audit.history import Fleet, vm

pytestmark = pytest.mark.integration

# The seed's queries as the demo runs them, with the seed's own VM names.
SEED_QUERY_1 = seed.SEED_QUERY_1.format(vm_path="/DatabanxDC/vm/pgtest1")
SEED_QUERY_2 = seed.SEED_QUERY_2.format(vm_name="pgtest1")


def records(events: list[Event]) -> list[AuditRecord]:
    """Events as if read from Kafka (offsets per topic, one partition)."""
    offsets: dict[str, int] = {}
    out = []
    for e in events:
        t = topic_for(e).name
        out.append(AuditRecord(t, 0, offsets.setdefault(t, 0), e))
        offsets[t] += 1
    return out


async def count(repo: AuditRepository, table: str) -> int:
    return int((await repo.fetch(f"SELECT count(*) AS n FROM {table}"))[0]["n"])


def stored_events(events: list[Event]) -> int:
    return len({e.event_id for e in events if not isinstance(e, SyncProgress)})


async def test_seed_queries_after_two_cycles(audit_settings: Settings,
                                             repo: AuditRepository) -> None:
    pg, jump = vm("pgtest1", (2000, 2001)), vm("QCDev-Jump05", (2000,))
    fleet = Fleet()
    first = fleet.cycle(pg, jump)
    second = fleet.cycle(pg, jump)
    await publish(audit_settings, fleet.events)
    async with running_audit(audit_settings):
        await wait_for(lambda: _has(repo, "cbt_history", 6), what="6 commits stored")
        await wait_for(lambda: _has(repo, "events", stored_events(fleet.events)),
                       what="every event stored")

    rows = await repo.fetch(SEED_QUERY_1)
    print("seed query 1:", *rows, sep="\n  ")
    latest = {p.disk.disk_id: p for p in second if p.disk.vm_name == "pgtest1"}
    older = {p.disk.disk_id: p for p in first if p.disk.vm_name == "pgtest1"}
    assert len(rows) == 4
    # Newest first: the second cycle's job of each disk, each with its OWN disk's change ID.
    assert {r["disk_id"]: (r["job_id"], r["disk_change_id"]) for r in rows[:2]} == {
        d: (p.sync_id, p.change_id) for d, p in latest.items()}
    assert {r["disk_id"]: (r["job_id"], r["disk_change_id"]) for r in rows[2:]} == {
        d: (p.sync_id, p.change_id) for d, p in older.items()}
    assert latest["disk-2000"].change_id != latest["disk-2001"].change_id

    jobs = await repo.fetch(SEED_QUERY_2)
    print("seed query 2:", *jobs, sep="\n  ")
    assert len(jobs) == 4
    second_ids = {p.sync_id for p in second}
    assert [j["id"] in second_ids for j in jobs] == [True, True, True, False]
    for j in jobs[:3]:
        assert (j["replication_type"], j["status"]) == ("incremental", "completed"), j
    assert (jobs[3]["replication_type"], jobs[3]["status"]) == ("initial", "completed")

    # The read API other components use.
    ids = await repo.latest_change_ids("/DatabanxDC/vm/pgtest1")
    assert {(d.disk_id, d.change_id, d.job_id) for d in ids} == {
        (d, p.change_id, p.sync_id) for d, p in latest.items()}
    hist = await repo.disk_history(pg.disk(2001).key)
    assert [h.change_id for h in hist] == [older["disk-2001"].change_id,
                                           latest["disk-2001"].change_id]
    assert hist[1].previous_change_id == hist[0].change_id
    assert [h.replication_type for h in hist] == ["full", "incremental"]
    assert not any(h.refused for h in hist)
    # Progress is kept as the latest per sync, not as rows of the log.
    assert await count(repo, "events") == stored_events(fleet.events)
    job = (await repo.fetch("SELECT * FROM replication_jobs WHERE id = $1",
                            latest["disk-2000"].sync_id))[0]
    assert job["progress_bytes_done"] == job["progress_bytes_total"] > 0
    disk = (await repo.fetch("SELECT * FROM vm_disks WHERE job_id = $1",
                             latest["disk-2000"].sync_id))[0]
    assert disk["previous_change_id"] == older["disk-2000"].change_id
    assert disk["base_change_id"] == older["disk-2000"].change_id
    assert disk["snapshot_removed_at"] is not None


async def _has(repo: AuditRepository, table: str, n: int) -> bool:
    return await count(repo, table) >= n


async def test_replay_is_idempotent_and_order_independent(
        stack_settings: Settings, repo: AuditRepository) -> None:
    a, b = vm("pgtest1", (2000, 2001)), vm("solo", (204,))
    fleet = Fleet()
    for _ in range(3):
        fleet.cycle(a, b)
    plans = fleet.snapshot(a)  # a sync left running
    fleet.copy(plans[0], previous=None)  # refused by the guard: lineage_mismatch
    recs = records(fleet.events)
    assert await repo.apply(recs) == stored_events(fleet.events)
    once = await dump(repo)
    assert await repo.apply(recs) == 0
    assert await repo.apply(recs[len(recs) // 2:] + recs[:7]) == 0
    assert await dump(repo) == once

    shuffled = list(recs)
    random.Random(7).shuffle(shuffled)
    other = repo.schema + "_r"
    try:
        n = await rebuild(shuffled, other, stack_settings.postgres, batch_size=37)
        assert n == stored_events(fleet.events)
        async with AuditRepository(stack_settings.postgres, schema=other) as r2:
            assert await dump(r2) == once
    finally:
        async with AuditRepository(stack_settings.postgres, schema=other) as r2:
            await r2.reset_schema(replace=True)
    assert len(once["cbt_history"]) == 3 * 3 + 1
    assert sum(r["refused"] for r in once["cbt_history"]) == 1


@pytest.mark.parametrize("refusal_first", [False, True])
async def test_refused_commit_never_looks_committed(repo: AuditRepository,
                                                    refusal_first: bool) -> None:
    pg = vm("pgtest1", (2000, 2001))
    fleet = Fleet()
    fleet.cycle(pg)
    plans = fleet.snapshot(pg)
    good = fleet.copy(plans[0])
    bad = fleet.copy(plans[1], previous=None)  # claims to continue from nothing
    refusal = fleet.events[-1]
    assert isinstance(refusal, SyncFailed) and refusal.reason == "lineage_mismatch"
    recs = records(fleet.events)
    assert recs[-2].event == bad
    # Topics are read concurrently: the refusal may be stored before the commit it refuses.
    # Separate transactions, in either order.
    await repo.apply(recs[:-2])
    for i in ((-1, -2) if refusal_first else (-2, -1)):
        await repo.apply([recs[i]])

    rows = await repo.fetch(SEED_QUERY_1)
    assert bad.sync_id not in {r["job_id"] for r in rows}
    assert good.sync_id in {r["job_id"] for r in rows}
    job = (await repo.fetch("SELECT status, failure_reason, committed_at FROM replication_jobs "
                            "WHERE id = $1", bad.sync_id))[0]
    assert job == {"status": "failed", "failure_reason": "lineage_mismatch",
                   "committed_at": None}
    hist = {h.event_id: h.refused for h in await repo.disk_history(bad.disk.key)}
    assert hist[bad.event_id] is True and list(hist.values()).count(True) == 1
    latest = {d.disk_id: d.change_id for d in await repo.latest_change_ids(
        vm_instance_uuid=pg.uuid)}
    assert latest["disk-2000"] == good.change_id
    assert latest["disk-2001"] != bad.change_id  # still the first cycle's commit


async def test_undecodable_records_go_to_dead_letter(audit_settings: Settings,
                                                     repo: AuditRepository) -> None:
    pg = vm("pgtest1", (2000,))
    fleet = Fleet()
    fleet.cycle(pg)
    other = vm("other", (2000,)).disk(2000)
    planned = topic_name(SYNC_PLANNED, audit_settings.kafka)
    _, plan_value, headers = encode(next(e for e in fleet.events if e.event_type == "SyncPlanned"))
    async with Publisher(audit_settings.kafka) as pub:
        await pub.publish_raw(planned, b"garbage", b"\xff\xfe not json", [])
        # A valid plan keyed by another disk: the bug class this project exists for.
        await pub.publish_raw(planned, other.key.encode(), plan_value, headers)
    await publish(audit_settings, fleet.events)
    async with running_audit(audit_settings) as consumer:
        await wait_for(lambda: _has(repo, "events", stored_events(fleet.events) + 2),
                       what="events and the two dead letters stored")
        assert consumer.stats.dead_letters == 2
    letters = await repo.fetch("SELECT body FROM events WHERE event_type = 'DeadLetter'")
    # Both letters may come from offset 0 (different partitions): order them by their key.
    bodies = sorted((DeadLetter.model_validate_json(r["body"]) for r in letters),
                    key=lambda d: d.original_key != "garbage")
    assert [b.stage for b in bodies] == ["audit", "audit"]
    assert bodies[0].original_value_encoding == "base64"
    assert "does not name the body's disk" in bodies[1].error
    assert bodies[1].original_key == other.key
    assert await count(repo, "cbt_history") == 1  # the valid events all went in


async def _committed(settings: Settings, group: str) -> int:
    """Sum of the committed offsets of ``group`` over every topic partition."""
    c = AIOKafkaConsumer(**client_kwargs(settings.kafka), group_id=group,
                         enable_auto_commit=False)
    await c.start()
    try:
        total = 0
        for spec in ALL_TOPICS:
            for p in range(settings.kafka.partitions):
                tp = TopicPartition(topic_name(spec, settings.kafka), p)
                total += await c.committed(tp) or 0
        return total
    finally:
        await c.stop()


async def test_postgres_outage_waits_and_catches_up(audit_settings: Settings,
                                                    repo: AuditRepository) -> None:
    proxy = PgProxy(audit_settings.postgres.host, audit_settings.postgres.port)
    await proxy.open()
    pg = audit_settings.postgres.model_copy(update={"port": proxy.port})
    settings = audit_settings.model_copy(update={"postgres": pg})
    a, b = vm("pgtest1", (2000, 2001)), vm("QCDev-Jump05", (2000,))
    fleet = Fleet()
    fleet.cycle(a, b)
    n1 = len(fleet.events)
    fleet.cycle(a, b)
    fleet.cycle(a, b)
    batch1, batch2 = fleet.events[:n1], fleet.events[n1:]
    group = f"{settings.kafka.topic_prefix}cbtstream-audit"
    try:
        await publish(settings, batch1)
        async with running_audit(settings) as consumer:
            await wait_for(lambda: _has(repo, "events", stored_events(batch1)), what="batch 1")
            await wait_for(lambda: _offsets_at(settings, group, len(batch1)), what="offsets 1")
            await proxy.close()
            await publish(settings, batch2)
            await wait_for(lambda: _retried(consumer, 2), what="retries while down")
            # Nothing new reached the database and no offset moved past what is stored.
            assert await count(repo, "events") == stored_events(batch1)
            assert await _committed(settings, group) == len(batch1)
            await proxy.open()
            await wait_for(lambda: _has(repo, "events", stored_events(fleet.events)),
                           what="catch-up")
            await wait_for(lambda: _offsets_at(settings, group, len(fleet.events)),
                           what="offsets 2")
    finally:
        await proxy.close()
    assert await count(repo, "events") == stored_events(fleet.events)
    assert await count(repo, "cbt_history") == 3 * 3
    assert await count(repo, "replication_jobs") == 3 * 3
    rows = await repo.fetch(SEED_QUERY_1)
    assert len(rows) == 6 and len({r["job_id"] for r in rows}) == 6


async def _retried(consumer: object, n: int) -> bool:
    return bool(getattr(consumer, "stats").retries >= n)  # noqa: B009


async def _offsets_at(settings: Settings, group: str, n: int) -> bool:
    return await _committed(settings, group) == n


async def test_backlog_is_stored_whole_in_batches(audit_settings: Settings,
                                                  repo: AuditRepository) -> None:
    """A backlog (40 VMs x 3 disks x 3 cycles) is stored whole, written in batches (many events per
    transaction), not one round trip per event. The rate is printed for information only: speed
    is measured by benchmarks, never asserted in a test."""
    vms = [vm(f"vm{i:03d}", (2000, 2001, 2002)) for i in range(40)]
    fleet = Fleet()
    for _ in range(3):
        fleet.cycle(*vms)
    total = stored_events(fleet.events)
    await publish(audit_settings, fleet.events)
    t0 = time.monotonic()
    async with running_audit(audit_settings) as consumer:
        await wait_for(lambda: _has(repo, "events", total), timeout=120, what="all stored")
        wall = time.monotonic() - t0
    rate_busy = consumer.stats.stored / consumer.stats.busy_s
    print(f"\naudit throughput: {total} events ({len(fleet.events)} records) in {wall:.2f}s "
          f"wall = {len(fleet.events) / wall:.0f} records/s; "
          f"{rate_busy:.0f} events/s while busy; {consumer.stats.batches} batches")
    assert consumer.stats.stored == total
    assert 0 < consumer.stats.batches < total / 4


async def test_decode_roundtrip_of_stored_bodies(repo: AuditRepository) -> None:
    """The events table keeps each body verbatim: it decodes back to the same event."""
    fleet = Fleet()
    fleet.cycle(vm("pgtest1", (2000, 2001)))
    await repo.apply(records(fleet.events))
    rows = await repo.fetch("SELECT event_id, disk_key, body FROM events")
    by_id = {e.event_id: e for e in fleet.events}
    for r in rows:
        assert decode(r["body"], key=r["disk_key"]) == by_id[r["event_id"]]
    assert len(rows) == stored_events(fleet.events)
    assert DEADLETTER.name == "cbt.deadletter"
