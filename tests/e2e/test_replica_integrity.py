"""Replicas that know what they hold, on the real pipeline (Kafka, Faust, the simulator, nbdkit):
one failure class after another on one VM, and after each the replica is compared byte for byte
with the snapshot (the disk model) and the outcome's reason is checked.

Classes: replica deleted; replica replaced by another file of the same size; torn state record;
a byte flipped behind the copier's back (found by ``cbtstream verify``, repaired by the next
sync); an old plan re-produced with kcat while its snapshot still exists, with and without the
copier's state dir; the plan the replica holds re-produced (same commit again); a copier on a new
host (empty target root and state dir). Snapshots are kept (``remove_snapshots = false``), as an
upstream publisher would keep them, so old plans stay executable.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cbtctl.demo.processes import child_env
from cbtctl.demo.scenario import CycleResult, Scenario, files_equal, random_name
from cbtctl.demo.workload import MiB, initial_fill, scattered
from cbtstream.config import Settings
from cbtstream.kafka import topic_name
from consumers.replica.location import TargetResolver
from schemas.events import ChangeIdCommitted, ReplicaMismatch, SyncFailed, SyncPlanned
from schemas.topics import REPLICA_VERIFIED, SYNC_PLANNED
from tests.e2e.conftest import Pipeline
from tests.support import read_topic

pytestmark = pytest.mark.integration

SIZES = [16 * MiB, 4 * MiB + 64 * 1024]


@pytest.fixture
def e2e_settings(e2e_settings: Settings) -> Settings:
    streams = e2e_settings.streams.model_copy(update={"remove_snapshots": False})
    return e2e_settings.model_copy(update={"streams": streams})


def _by_disk(c: CycleResult) -> dict[str, tuple[str, str, bool]]:
    return {r.disk_id: (r.replication_type, r.reason, r.verified) for r in c.rows}


def _verify(settings: Settings, *args: str) -> tuple[int, list[dict[str, object]]]:
    out = subprocess.run([sys.executable, "-m", "cbtctl.cli", "verify", "--json", *args],
                         env=child_env(settings), capture_output=True, text=True, timeout=120)
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return out.returncode, rows


def _produce(settings: Settings, plan: SyncPlanned) -> None:
    """Re-produce an old plan as an operator would, with kcat (murmur2 places the key where the
    pipeline does)."""
    subprocess.run(
        ["kcat", "-P", "-b", settings.kafka.bootstrap_servers, "-X", "partitioner=murmur2_random",
         "-t", topic_name(SYNC_PLANNED, settings.kafka), "-k", plan.disk.key],
        input=plan.model_dump_json().encode() + b"\n", check=True, timeout=30)


def _flip_byte(path: Path, offset: int) -> None:
    """Change one byte of a replica behind the copier's back (bit rot, a stray write)."""
    with open(path, "r+b") as fh:
        fh.seek(offset)
        old = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([old[0] ^ 0xFF]))


async def _outcome_of(scenario: Scenario, sync_id: object, kind: type, after: int) -> object:
    w = scenario.watcher
    assert w is not None

    def found() -> list[object]:
        return [e for e in w.events[after:] if isinstance(e, kind)
                and getattr(e, "sync_id", None) == sync_id]

    await w.wait_for(lambda: bool(found()), 60)
    return found()[0]


async def _cycle(scenario: Scenario, n: int) -> CycleResult:
    assert scenario.vm is not None
    rng = scenario.rng
    c = await scenario.cycle(n, [w for d in scenario.vm.disks
                                 for w in scattered(rng, d.key, d.capacity)])
    assert all(r.verified for r in c.rows), c.rows  # every replica equals its snapshot
    return c


async def test_replica_failure_classes(scenario: Scenario, pipeline: Pipeline,
                                       e2e_settings: Settings, tmp_path: Path) -> None:
    pipeline.start_copier()
    vm = await scenario.create_vm(random_name("e2e-replica"), SIZES)
    a, b = (d.key for d in vm.disks)
    da, db = f"disk-{a}", f"disk-{b}"
    rng = scenario.rng
    c1 = await scenario.cycle(1, [w for d in vm.disks for w in initial_fill(rng, d.key,
                                                                           d.capacity)])
    assert {r.reason for r in c1.rows} == {"no_previous_commit"}
    c2 = await _cycle(scenario, 2)
    assert {r.replication_type for r in c2.rows} == {"incremental"}

    # 1. the replica is deleted between cycles: never re-created under an incremental
    scenario.replica(a).unlink()
    c3 = await _cycle(scenario, 3)
    assert _by_disk(c3) == {da: ("full", "replica_missing", True),
                            db: ("incremental", "previous_commit", True)}

    # 2. replaced by another file of the same size (new inode)
    path = scenario.replica(a)
    other = path.with_suffix(".other")
    other.write_bytes(rng.randbytes(path.stat().st_size))
    other.replace(path)
    c4 = await _cycle(scenario, 4)
    assert _by_disk(c4)[da] == ("full", "replica_replaced", True)

    # 3. a torn state record
    state = path.with_name(path.name + ".state")
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    c5 = await _cycle(scenario, 5)
    assert _by_disk(c5)[da] == ("full", "replica_state_unknown", True)
    assert _by_disk(c5)[db] == ("incremental", "previous_commit", True)

    # 4. a byte flipped in a replica behind the copier's back: verify finds it, the next sync
    # copies that disk in full and the replica equals the snapshot again
    rc, rows = _verify(e2e_settings)
    assert rc == 0 and {r["result"] for r in rows} == {"equal"} and len(rows) == 2, rows
    _flip_byte(scenario.replica(b), 4096)
    rc, rows = _verify(e2e_settings, "--disk", f"{vm.instance_uuid}/{db}")
    assert rc == 1 and rows[0]["result"] == "mismatch", rows
    events = await read_topic(e2e_settings, REPLICA_VERIFIED,
                              until=lambda ev: any(isinstance(e, ReplicaMismatch) for e in ev))
    mismatch = next(e for e in events if isinstance(e, ReplicaMismatch))
    assert mismatch.disk.device_key == b and mismatch.first_bad_offset == 0
    c6 = await _cycle(scenario, 6)
    assert _by_disk(c6) == {da: ("incremental", "previous_commit", True),
                            db: ("full", "replica_mismatch", True)}
    rc, rows = _verify(e2e_settings, "--source")
    assert rc == 0 and all(r["source_digest"] == r["replica_digest"] for r in rows), rows

    # 5. an old plan re-produced with kcat while its snapshot exists: refused, never written
    w = scenario.watcher
    assert w is not None
    old = w.plans(c2.vm_snapshot)[a]
    mark = len(w.events)
    _produce(e2e_settings, old)
    failed = await _outcome_of(scenario, old.sync_id, SyncFailed, mark)
    assert isinstance(failed, SyncFailed) and failed.reason == "stale_plan", failed
    assert files_equal(scenario.replica(a), scenario.model(a))

    # ... and again with the copier's state dir (checkpoints, ledger) gone
    assert pipeline.copier is not None
    pipeline.copier.stop()
    shutil.rmtree(e2e_settings.copier.state_dir)
    pipeline.start_copier()
    older = w.plans(c1.vm_snapshot)[a]
    mark = len(w.events)
    _produce(e2e_settings, older)
    failed = await _outcome_of(scenario, older.sync_id, SyncFailed, mark)
    assert isinstance(failed, SyncFailed) and failed.reason == "stale_plan", failed
    assert files_equal(scenario.replica(a), scenario.model(a))
    # the plan the replica holds, delivered again: the same commit is published again, no write
    held = w.plans(c6.vm_snapshot)[a]
    first = w.outcomes(c6.vm_snapshot)[a]
    mark = len(w.events)
    _produce(e2e_settings, held)
    again = await _outcome_of(scenario, held.sync_id, ChangeIdCommitted, mark)
    assert isinstance(again, ChangeIdCommitted) and isinstance(first, ChangeIdCommitted)
    assert (again.event_id, again.replica_digest) == (first.event_id, first.replica_digest)
    assert files_equal(scenario.replica(a), scenario.model(a))

    # 6. the copier moves to a new host: empty target root and state dir
    pipeline.copier.stop()
    moved = e2e_settings.copier.model_copy(update={"target_root": tmp_path / "host2-replicas",
                                                   "state_dir": tmp_path / "host2-state"})
    pipeline.settings = e2e_settings.model_copy(update={"copier": moved})
    scenario.targets = TargetResolver(moved)
    pipeline.start_copier()
    c7 = await _cycle(scenario, 7)
    assert _by_disk(c7) == {da: ("full", "replica_missing", True),
                            db: ("full", "replica_missing", True)}

    # and the repaired replicas are trusted again: the next cycle is incremental everywhere
    c8 = await _cycle(scenario, 8)
    assert {r.replication_type for r in c8.rows} == {"incremental"}


async def test_copier_patrol_finds_a_flipped_byte(scenario: Scenario, pipeline: Pipeline,
                                                  e2e_settings: Settings) -> None:
    """With ``copier.verify_interval_s`` the copier re-hashes its replicas by itself: a byte
    changed behind its back is reported (``ReplicaMismatch``) and the next sync repairs it."""
    copier = e2e_settings.copier.model_copy(update={"verify_interval_s": 0.3})
    pipeline.settings = e2e_settings.model_copy(update={"copier": copier})
    pipeline.start_copier()
    vm = await scenario.create_vm(random_name("e2e-patrol"), SIZES)
    a, b = (d.key for d in vm.disks)
    rng = scenario.rng
    await scenario.cycle(1, [w for d in vm.disks for w in initial_fill(rng, d.key, d.capacity)])
    await _cycle(scenario, 2)
    events = await read_topic(e2e_settings, REPLICA_VERIFIED, until=lambda ev: {
        e.disk.device_key for e in ev if type(e).__name__ == "ReplicaVerified"} >= {a, b},
        timeout=60)
    assert not any(isinstance(e, ReplicaMismatch) for e in events)
    _flip_byte(scenario.replica(a), 3 * MiB + 17)
    events = await read_topic(e2e_settings, REPLICA_VERIFIED, until=lambda ev: any(
        isinstance(e, ReplicaMismatch) for e in ev), timeout=60)
    mismatch = next(e for e in events if isinstance(e, ReplicaMismatch))
    assert mismatch.disk.device_key == a and mismatch.first_bad_offset == 3 * MiB
    assert mismatch.bad_leaves == 1
    c3 = await _cycle(scenario, 3)
    assert _by_disk(c3)[f"disk-{a}"] == ("full", "replica_mismatch", True)
    assert _by_disk(c3)[f"disk-{b}"] == ("incremental", "previous_commit", True)
