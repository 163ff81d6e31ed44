"""A generated corpus of malformed and hostile records (tests/badinput/corpus.py) against the real
pipeline: Faust worker, vSphere copier (simulator + NBD), audit consumer (PostgreSQL), and
``cbtstream publish``, while a real simulated VM runs three replication cycles.

Every corpus record goes raw to its topic (every input of the planner, the copier and the audit
consumer), in three chunks sent while the VM's cycles run. Checked:

- a record undecodable for its topic is dead-lettered by every consumer of that topic, once,
  with its origin headers and its key and value kept (the audit consumer only logs a bad record
  of the dead-letter topic itself);
- a forged ``ChangeIdCommitted`` (another disk's change ID, a sync that is not running) is
  answered by ``SyncFailed(lineage_mismatch)`` with its derived id and never applied;
- a well-formed snapshot or plan naming a path-like snapshot, a VM or snapshot that does not
  exist ends in the copier's ``SyncFailed`` with the stated reason (``not_allowed`` before any
  vSphere/NBD call, ``not_found`` / ``export_not_found``), never in a commit;
- ``cbtstream publish`` rejects exactly the bad lines (``line N: reason``, exit 1) and publishes
  the others, which end like the well-formed snapshots above;
- the VM's cycles complete as without the corpus: full, then incremental from each disk's own
  change ID, replicas equal to the snapshots byte for byte, exactly its commits in the log;
- nothing was written outside the replica files of the VM's disks: the temp tree differs only
  there (and in the processes' own state and log dirs); no name carrying the corpus marker exists
  under the temp dir, /tmp or the repository.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from cbtctl.demo.processes import Proc, child_env
from cbtctl.demo.scenario import CycleResult, Scenario, random_name
from cbtctl.demo.workload import MiB, initial_fill, scattered
from cbtctl.replay.reader import consumer_lag, pipeline_stages
from cbtstream.config import Settings
from cbtstream.kafka import client_kwargs, topic_name
from cbtstream.vsphere.simctl import SimulatorControl
from consumers.audit.repository import AuditRepository
from schemas.codec import EventDecodeError, decode
from schemas.events import ChangeIdCommitted, SyncFailed, stable_event_id
from schemas.topics import ALL_TOPICS, CHANGEID_COMMITTED, DEADLETTER, SYNC_FAILED
from tests.badinput import files
from tests.badinput.corpus import (
    COPIER_TOPICS,
    PLANNER_TOPICS,
    BadRecord,
    Context,
    Expect,
    corpus,
    publish_lines,
    summary,
)
from tests.support import read_topic

pytestmark = pytest.mark.integration

SEED = 8
#: Records per category per topic: 3 (cycle 1, synthetic change IDs) + 9 (cycles 2-3, the real
#: disks' change IDs known) -> 7 topics x 14 categories x 12 = 1,176 records, plus every path-like
#: vm_snapshot in a snapshot and a plan (2 x 2 x 26) = 1,280.
FIRST, LATER = 3, 9
SIZES = [4 * MiB, 2 * MiB + 64 * 1024]
BIG = 4 * 1024 * 1024
REPO = Path(__file__).resolve().parents[2]
STAGES = {**{t: ("planner", "audit") for t in PLANNER_TOPICS},
          **{t: ("copier", "audit") for t in COPIER_TOPICS},
          "cbt.sync.progress": ("audit",), "cbt.snapshot.removed": ("audit",),
          "cbt.deadletter": ()}

Coord = tuple[str, int, int]


async def _allow_big_records(settings: Settings) -> None:
    admin = AIOKafkaAdminClient(**client_kwargs(settings.kafka))
    await admin.start()
    try:
        # alter_configs replaces a topic's whole configuration: keep the catalogue's (the
        # worker refuses a topic whose retention or cleanup policy differs from it)
        await admin.alter_configs([
            ConfigResource(ConfigResourceType.TOPIC, topic_name(spec, settings.kafka),
                           configs={**spec.config,
                                    "max.message.bytes": str(BIG if spec is not DEADLETTER
                                                             else 8 * 1024 * 1024)})
            for spec in ALL_TOPICS])
    finally:
        await admin.close()


async def _send(producer: AIOKafkaProducer, settings: Settings, records: list[BadRecord],
                sent: dict[Coord, BadRecord]) -> None:
    prefix = settings.kafka.topic_prefix
    futures = []
    for r in records:
        futures.append((r, await producer.send(prefix + r.topic, key=r.key, value=r.value)))
        await asyncio.sleep(0)  # interleave with the cycle's own events
    for r, fut in futures:
        meta = await fut
        sent[(r.topic, meta.partition, meta.offset)] = r


def _publish(settings: Settings, lines: list[BadRecord], path: Path
             ) -> subprocess.CompletedProcess[bytes]:
    path.write_bytes(b"".join((r.value or b"") + b"\n" for r in lines))
    return subprocess.run([sys.executable, "-m", "cbtctl.cli", "publish", str(path)],
                          env=child_env(settings), capture_output=True, timeout=60,
                          check=False)


def _kept(text: str | None, encoding: str) -> bytes | None:
    if text is None:
        return None
    return base64.b64decode(text) if encoding == "base64" else text.encode(
        errors="surrogatepass")


def _cycles_ok(cycles: list[CycleResult]) -> None:
    for c in cycles:
        assert all(r.verified for r in c.rows), c.rows
    assert {(r.replication_type, r.reason) for r in cycles[0].rows} == {
        ("full", "no_previous_commit")}
    for prev, cur in itertools.pairwise(cycles):
        before = {e.disk.disk_id: e.change_id for e in prev.events}
        for r in cur.rows:
            assert (r.replication_type, r.reason) == ("incremental", "previous_commit"), r
            assert r.base_change_id == before[r.disk_id]


async def test_hostile_corpus_on_every_input(badinput_settings: Settings, tmp_path: Path
                                            ) -> None:
    await run_corpus(badinput_settings, tmp_path, FIRST, LATER)


@pytest.mark.soak
@pytest.mark.timeout(1800)
async def test_hostile_corpus_soak(badinput_settings: Settings, tmp_path: Path) -> None:
    """About 4,700 records: 3 + 45 per category per topic."""
    await run_corpus(badinput_settings, tmp_path, FIRST, 45)


async def run_corpus(settings: Settings, tmp_path: Path, first_n: int, later_n: int) -> None:
    t0 = time.monotonic()
    await _allow_big_records(settings)
    marker = f"cbtmark{uuid.uuid4().hex[:8]}"
    tmp_top = Path("/tmp")
    before = files.tree(tmp_path)
    logs = tmp_path / "logs"
    procs = [Proc(["worker"], settings, logs / "worker.log"),
             Proc(["copier"], settings, logs / "copier.log"),
             Proc(["audit"], settings, logs / "audit.log")]
    sim = SimulatorControl.from_state(settings.stack.dir.resolve() / "vcsim")
    sc = Scenario(settings, sim, tmp_path / "models", seed=SEED, timeout_s=120)

    def alive() -> None:
        for p in procs:
            if not p.alive:
                raise RuntimeError(f"{p.log.name} exited:\n{p.output()[-4000:]}")

    sc.check_alive.append(alive)
    sent: dict[Coord, BadRecord] = {}
    producer = AIOKafkaProducer(**client_kwargs(settings.kafka), max_request_size=BIG,
                                acks="all", linger_ms=5)
    await producer.start()
    try:
        vm = await sc.create_vm(random_name("badinput"), SIZES)
        keys = tuple(d.key for d in vm.disks)
        ctx = Context(vm=vm.instance_uuid, device_keys=keys, marker=marker)
        first = corpus(SEED, ctx, per_category=first_n)
        rng = sc.rng

        async def cycle(n: int, writes: Any, chunk: list[BadRecord]) -> CycleResult:
            sender = asyncio.create_task(_send(producer, settings, chunk, sent))
            result = await sc.cycle(n, writes)
            await sender
            return result

        c1 = await cycle(1, [w for d in vm.disks for w in initial_fill(rng, d.key, d.capacity)],
                         first)
        ctx.change_ids.update({e.disk.device_key: e.change_id for e in c1.events
                               if e.change_id is not None})
        later = corpus(SEED + 1, ctx, per_category=later_n)
        lines = publish_lines(SEED + 2, ctx, per_category=4)
        half = len(later) // 2
        published = asyncio.create_task(asyncio.to_thread(
            _publish, settings, lines, tmp_path / "lines.jsonl"))
        c2 = await cycle(2, [w for d in vm.disks for w in scattered(rng, d.key, d.capacity)],
                         later[:half])
        c3 = await cycle(3, [w for d in vm.disks for w in scattered(rng, d.key, d.capacity)],
                         later[half:])
        pub = await published
        records = first + later
        print("corpus:", json.dumps(summary(records)), f"publish lines: {len(lines)}")
        print(f"cycles done at {time.monotonic() - t0:.1f}s")
        _cycles_ok([c1, c2, c3])

        # -- publish: exactly the bad lines rejected, with their numbers ------------------------
        err = pub.stderr.decode(errors="replace").splitlines()
        rejected = {int(x.split("line ", 1)[1].split(":", 1)[0]) for x in err if ": line " in x}
        bad_lines = {i for i, r in enumerate(lines, 1) if r.expect == Expect.DEAD}
        assert pub.returncode == 1, pub.stderr[-2000:]
        assert rejected == bad_lines, (sorted(rejected ^ bad_lines), pub.stderr[-3000:])
        good_lines = [r for r in lines if r.expect != Expect.DEAD]
        assert len(pub.stdout.splitlines()) == len(good_lines)

        # -- outcomes ---------------------------------------------------------------------------
        dead = {c: r for c, r in sent.items() if r.expect == Expect.DEAD}
        want_letters = {(c, stage) for c, r in dead.items() for stage in STAGES[r.topic]}
        hostile = [r for r in (*sent.values(), *good_lines) if r.expect != Expect.DEAD]
        want_failed = {r.outcome_id for r in hostile if r.expect in (Expect.FAILED,
                                                                     Expect.REFUSED)}

        def produced(recs: list[Any]) -> list[Any]:
            """Letters written by the consumers (the topic also holds the corpus' own)."""
            return [r for r in recs if ("cbt.deadletter", r.partition, r.offset) not in sent]

        def letters_done(recs: list[Any]) -> bool:
            got = {(_origin(r), json.loads(r.value)["stage"]) for r in produced(recs)}
            return want_letters <= got

        letters = await read_topic(settings, DEADLETTER, raw=True, until=letters_done,
                                   timeout=90, watch=tuple(procs))

        def outcomes(recs: list[Any]) -> list[SyncFailed]:
            """The SyncFailed events written by the pipeline (not the corpus' own)."""
            out = []
            for r in recs:
                if ("cbt.sync.failed", r.partition, r.offset) not in sent:
                    ev = decode(r.value, key=r.key)
                    assert isinstance(ev, SyncFailed)
                    out.append(ev)
            return out

        def failed_done(recs: list[Any]) -> bool:
            evs = outcomes(recs)
            return want_failed <= {e.event_id for e in evs} | {e.sync_id for e in evs}

        failures = outcomes(await read_topic(settings, SYNC_FAILED, raw=True,
                                             until=failed_done, timeout=90, watch=tuple(procs)))
        await asyncio.sleep(2)  # anything extra (a second letter, a commit) shows up now
        letters = await read_topic(settings, DEADLETTER, raw=True, until=letters_done)
        n_commits = await _end_offsets(settings, CHANGEID_COMMITTED)
        commits = await read_topic(settings, CHANGEID_COMMITTED, raw=True,
                                   until=lambda recs: len(recs) >= n_commits)
        print(f"outcomes read at {time.monotonic() - t0:.1f}s")

        _check_letters(produced(letters), sent, dead)
        _check_failures(failures, hostile)
        _check_commits(commits, sent, vm.instance_uuid, keys)
        await _check_audit(settings, sent, procs[2])
        await _wait_caught_up(settings)
    except BaseException:
        for p in procs:
            print(f"--- {p.log.name}\n{p.output()[-5000:]}")
        raise
    finally:
        await producer.stop()
        await sc.close()
        for p in procs:
            p.stop()

    # -- nothing written outside the targets ----------------------------------------------------
    after = files.tree(tmp_path)
    # each real disk's replica and its record (state, lock, its hash tree: version 2's pieces,
    # leaves and the leaves' undo journal, or version 1's tree; resume checkpoints by sync id),
    # nothing else
    ours = re.compile(
        r"^disk-(\d+)\.img(\.state|\.lock|\.tree\.\d+|\.pieces\.\d+|\.leaves\.(\d+|undo)"
        r"|\.checkpoint\.[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})?$")

    def own_replica_file(name: str) -> bool:
        m = ours.match(name)
        return m is not None and int(m[1]) in keys

    own = ("logs", "faust", "copier", "models", "lines.jsonl")
    unexpected = {p for p in files.changed(before, after)
                  if not p.startswith(own)
                  and not (p.startswith(f"replicas/{vm.instance_uuid}/")
                           and own_replica_file(p.rsplit("/", 1)[1]))
                  and p not in {"replicas", f"replicas/{vm.instance_uuid}"}}
    assert not unexpected, sorted(unexpected)[:20]
    assert sorted(os.listdir(tmp_path / "replicas")) == [vm.instance_uuid]
    listed = os.listdir(tmp_path / "replicas" / vm.instance_uuid)
    assert all(own_replica_file(n) for n in listed), listed
    assert {n for n in listed if n.endswith(".img")} == {f"disk-{k}.img" for k in keys}
    found = (files.marked([tmp_path, REPO], marker)
             + files.marked([tmp_top], marker, depth=0))
    assert not found, found
    print(f"total {time.monotonic() - t0:.1f}s")


async def _end_offsets(settings: Settings, spec: Any) -> int:
    """How many records a topic holds now (sum of its partitions' end offsets)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    name = topic_name(spec, settings.kafka)
    consumer = AIOKafkaConsumer(**client_kwargs(settings.kafka), group_id=None)
    await consumer.start()
    try:
        await consumer._client.force_metadata_update()
        tps = [TopicPartition(name, p) for p in consumer.partitions_for_topic(name) or set()]
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        return sum(ends.values())
    finally:
        await consumer.stop()


def _origin(rec: Any) -> Coord:
    """(base topic, partition, offset) a dead letter names (topic prefix removed)."""
    h = {k: v.decode() for k, v in rec.headers}
    topic = "cbt." + h["original-topic"].split(".cbt.", 1)[-1]
    return (topic, int(h["original-partition"]), int(h["original-offset"]))


def _check_letters(letters: list[Any], sent: dict[Coord, BadRecord],
                   dead: dict[Coord, BadRecord]) -> None:
    """Each undecodable record: one letter per consumer of its topic, whole; nothing else
    except the audit consumer's refusals of well-formed events PostgreSQL cannot store."""
    per: Counter[tuple[Coord, str]] = Counter()
    stray = []
    for rec in letters:
        body = json.loads(rec.value)
        origin, stage = _origin(rec), body["stage"]
        per[(origin, stage)] += 1
        r = dead.get(origin)
        if r is None:
            stray.append((origin, stage, body))
            continue
        assert stage in STAGES[r.topic], (r.category, r.kind, stage)
        h = {k: v for k, v in rec.headers}
        assert h["error"], r.kind
        assert rec.key == r.key, (r.category, r.kind)
        assert _kept(body["original_key"], body["original_key_encoding"]) == r.key
        if body["original_value"] is None and r.value is not None:
            assert "original-value-omitted" in h, r.kind  # too big: kept by size and digest
        else:
            assert _kept(body["original_value"], body["original_value_encoding"]) == r.value, (
                r.category, r.kind)
    twice = {k: n for k, n in per.items() if n > 1}
    assert not twice, list(twice.items())[:5]
    for origin, stage, body in stray:
        r = sent.get(origin)
        value = (body.get("original_value") or "").encode(errors="surrogatepass")
        # The audit consumer refuses what PostgreSQL cannot store (NUL, > bigint), including
        # events derived from hostile ones and dead letters holding such values.
        assert stage == "audit", (origin, stage, body["error"][:300])
        assert (r is not None and r.audit_may_refuse) or b"\\u0000" in value \
            or "\x00" in body.get("original_value", "") or origin[0] == "cbt.deadletter" \
            or any(len(t) > 18 for t in files_digits(value)), (origin, body["error"][:300])


def files_digits(v: bytes) -> list[bytes]:
    out, run = [], b""
    for ch in v:
        if 48 <= ch <= 57:
            run += bytes([ch])
        else:
            if run:
                out.append(run)
            run = b""
    return [*out, run] if run else out


def _check_failures(failures: list[Any], hostile: list[BadRecord]) -> None:
    by_id = {f.event_id: f for f in failures}
    by_sync: dict[uuid.UUID | None, list[SyncFailed]] = {}
    for f in failures:
        by_sync.setdefault(f.sync_id, []).append(f)
    for r in hostile:
        if r.expect == Expect.REFUSED:
            f = by_id[r.outcome_id]
            assert f.reason == "lineage_mismatch", (r.kind, f)
            assert f.event_id == stable_event_id("SyncFailed", "lineage_mismatch", r.event_id)
        elif r.expect == Expect.FAILED:
            got = by_sync[r.outcome_id]
            assert {f.reason for f in got} <= r.reasons, (r.category, r.kind,
                                                           [(f.reason, f.detail) for f in got])


def _check_commits(commits: list[Any], sent: dict[Coord, BadRecord], vm: str,
                   keys: tuple[int, ...]) -> None:
    """The log's commits: the corpus' forged ones, and exactly the VM's three per disk."""
    real = []
    for rec in commits:
        if ("cbt.changeid.committed", rec.partition, rec.offset) in sent:
            continue
        try:
            ev = decode(rec.value, key=rec.key)
        except EventDecodeError as exc:
            raise AssertionError(f"a commit in the log does not decode: {exc}") from None
        assert isinstance(ev, ChangeIdCommitted)
        real.append(ev)
    assert sorted((e.disk.vm_instance_uuid, e.disk.device_key) for e in real) == sorted(
        (vm, k) for k in keys for _ in range(3)), [(e.disk.key, e.vm_snapshot) for e in real]


async def _check_audit(settings: Settings, sent: dict[Coord, BadRecord], audit: Proc) -> None:
    """Every well-formed corpus event is in the audit trail (or refused by PostgreSQL and
    dead-lettered), and every bad record of the dead-letter topic was logged and skipped."""
    # SyncProgress is not kept in ``events`` (only as the newest progress of a known sync).
    wanted = {r.event_id: r for r in sent.values() if r.expect != Expect.DEAD and r.event_id
              and r.topic != "cbt.sync.progress"}
    bad_letters = sum(1 for r in sent.values()
                      if r.expect == Expect.DEAD and r.topic == "cbt.deadletter")
    async with AuditRepository(settings.postgres, schema=settings.postgres.db_schema) as repo:
        deadline = time.monotonic() + 60
        while True:
            rows = await repo.fetch("SELECT event_id FROM events WHERE event_id = ANY($1::uuid[])",
                                    list(wanted))
            stored = {r["event_id"] for r in rows}
            missing = [r for eid, r in wanted.items() if eid not in stored
                       and not r.audit_may_refuse]
            skipped = audit.output().count("unreadable dead letter skipped")
            if not missing and skipped >= bad_letters:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"audit: {len(missing)} well-formed events missing, e.g. "
                                     f"{[(m.topic, m.kind) for m in missing[:5]]}; "
                                     f"{skipped}/{bad_letters} bad letters skipped")
            await asyncio.sleep(0.5)
    assert skipped == bad_letters
    assert audit.alive


async def _wait_caught_up(settings: Settings, timeout: float = 60) -> dict[str, int]:
    """Every consumer group (planner, copier, audit) committed past every record: none is stuck
    behind a bad one. Returns the lag per stage."""
    deadline = time.monotonic() + timeout
    while True:
        lags = {s.stage.name: s.lag
                for s in await consumer_lag(settings.kafka, pipeline_stages(settings))}
        if not any(lags.values()):
            return lags
        if time.monotonic() > deadline:
            raise AssertionError(f"consumer groups behind: {lags}")
        await asyncio.sleep(1)
