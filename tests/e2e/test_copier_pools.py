"""Copier pools end to end (issue 20, item 5), on the real stack (Kafka, the simulator, nbdkit),
with copier processes standing for distinct hosts on this one machine (``tests/e2e/fleet.py``:
a host name, a state folder and a VDDK socket folder of their own).

* Shared pool: three copiers in the pool ``shared`` (one ``target_root`` for all: the shared
  storage) replicate six VMs of two disks over five cycles. In the third cycle a large
  incremental copy is running when its copier is killed (SIGKILL), and a fourth copier joins.
  Another member completes the copy from the checkpoint the killed one left beside the replica
  (it reads less than the changed bytes, and its engine logs ``resumed_from`` > 0); no copy
  after the seeding is full, no sync times out, and every replica equals its snapshot after
  every cycle.
* Host-local pools: pool ``a`` (host a, its own target root) and pool ``b`` (host b, another),
  VMs assigned half and half by ``[pools] assign``. While copier a is stopped (for three
  silent-sync time-outs), pool a's disks wait: no commit, no failure, no re-issued plan (the
  planner sees a pool without a live copier), nothing of theirs under b's root, never started by
  b. They finish incrementally once a is back; b's disks go on meanwhile.

Each test prints one line of JSON with its figures.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cbtctl.demo.run import stack_settings
from cbtctl.demo.scenario import Scenario, files_equal
from cbtctl.demo.workload import MiB, Write, initial_fill, scattered
from cbtstream.config import PoolAssignment, Settings
from cbtstream.kafka import create_topics
from cbtstream.vsphere.simctl import SimulatorControl
from schemas.events import (
    ChangeIdCommitted,
    FailureReason,
    SnapshotTaken,
    SyncFailed,
    SyncPlanned,
    SyncProgress,
)
from tests.e2e.conftest import _FAILED, vm_scenario
from tests.e2e.fleet import Fleet
from tests.support import isolated_settings

pytestmark = pytest.mark.integration

#: Partitions of the plans topic: enough for four members of one group to all hold some.
PARTITIONS = 8
#: Read rate per disk copy: the large disk's heavy incremental (24 MiB) lasts about 8 s.
RATE = 3 * MiB
#: The planner's silent-sync time-out: above a member's death plus a rebalance (~10-15 s: the
#: dead member's session expires after 10 s), far below the default, so a sync left silent by
#: the killed copier would show as re-issued and then timed out.
TIMEOUT_S = 30.0
#: The time-out of the host-local test: short, so copier a stays away for several of them.
LOCAL_TIMEOUT_S = 5.0


@pytest.fixture
async def kafka_settings(stack_settings: Settings, tmp_path: Path) -> AsyncIterator[Settings]:
    settings = isolated_settings(stack_settings, tmp_path, kafka={"partitions": PARTITIONS})
    await create_topics(settings.kafka)
    yield settings


@pytest.fixture
def e2e_settings(kafka_settings: Settings) -> Settings:
    s = stack_settings(kafka_settings)
    # 1 MiB requests and checkpoints: a killed copy leaves a checkpoint within a second
    copier = s.copier.model_copy(update={
        "checkpoint_bytes": MiB, "request_bytes": MiB, "max_bytes_per_s": RATE})
    streams = s.streams.model_copy(update={"sync_timeout_s": TIMEOUT_S,
                                           "sync_check_interval_s": 1.0})
    return s.model_copy(update={"copier": copier, "streams": streams})


@pytest.fixture
def fleet(e2e_settings: Settings, tmp_path: Path, request: pytest.FixtureRequest
          ) -> Iterator[Fleet]:
    f = Fleet(e2e_settings, tmp_path / "logs")
    yield f
    f.close()
    if request.node.stash.get(_FAILED, False):
        print(f.dump())


# -- helpers ------------------------------------------------------------------------------------
def _with_root(settings: Settings, root: Path) -> Settings:
    """``settings`` whose replicas are under ``root`` (where a scenario looks for them)."""
    return settings.model_copy(update={
        "copier": settings.copier.model_copy(update={"target_root": root})})


def _keys(sc: Scenario) -> list[int]:
    assert sc.vm is not None
    return [d.key for d in sc.vm.disks]


def _disk_key(sc: Scenario, key: int) -> str:
    assert sc.vm is not None
    return f"{sc.vm.instance_uuid}/disk-{key}"


def _seed(sc: Scenario) -> list[Write]:
    assert sc.vm is not None
    return [w for d in sc.vm.disks for w in initial_fill(sc.rng, d.key, d.capacity, 0.5)]


def _scattered(sc: Scenario) -> list[Write]:
    assert sc.vm is not None
    return [w for d in sc.vm.disks for w in scattered(sc.rng, d.key, d.capacity)]


def _dense(sc: Scenario, key: int, mib: int) -> list[Write]:
    """``mib`` MiB of new data from the start of disk ``key``: one changed area to copy."""
    return [Write(key, i * MiB, sc.rng.randbytes(MiB)) for i in range(mib)]


@dataclass
class Cycle:
    number: int
    #: per VM: its scenario and the SnapshotTaken of each of its disks
    taken: list[tuple[Scenario, list[SnapshotTaken]]] = field(default_factory=list)

    def snapshot_of(self, sc: Scenario) -> str:
        return next(evs[0].vm_snapshot for s, evs in self.taken if s is sc)

    def outcomes(self) -> Iterator[tuple[Scenario, SnapshotTaken, object]]:
        for sc, evs in self.taken:
            assert sc.watcher is not None
            out = sc.watcher.outcomes(evs[0].vm_snapshot)
            for ev in evs:
                yield sc, ev, out.get(ev.disk.device_key)

    def commits(self) -> list[tuple[SnapshotTaken, ChangeIdCommitted]]:
        return [(ev, o) for _, ev, o in self.outcomes() if isinstance(o, ChangeIdCommitted)]

    def latencies(self) -> list[float]:
        return [(o.occurred_at - ev.taken_at).total_seconds() for ev, o in self.commits()]

    def not_committed(self) -> list[tuple[str, str]]:
        return [(ev.disk.key, getattr(o, "reason", type(o).__name__))
                for _, ev, o in self.outcomes() if not isinstance(o, ChangeIdCommitted)]


async def _snapshot_all(number: int, vms: list[Scenario]) -> Cycle:
    taken = await asyncio.gather(*(sc.snapshot() for sc in vms))
    return Cycle(number, list(zip(vms, taken, strict=True)))


async def _wait(cycle: Cycle, vms: list[Scenario] | None = None) -> None:
    await asyncio.gather(*(sc.wait(evs[0].vm_snapshot, [e.disk.device_key for e in evs])
                           for sc, evs in cycle.taken if vms is None or sc in vms))


async def _cycle(number: int, vms: list[Scenario],
                 writes: Callable[[Scenario], list[Write]]) -> Cycle:
    for sc in vms:
        await sc.write(writes(sc))
    c = await _snapshot_all(number, vms)
    await _wait(c)
    return c


def _unequal(vms: list[Scenario]) -> list[str]:
    """The disks whose replica differs from its snapshot (the model), byte for byte."""
    return [_disk_key(sc, k) for sc in vms for k in _keys(sc)
            if not files_equal(sc.replica(k), sc.model(k))]


def _events(vms: list[Scenario]) -> list[object]:
    return [ev for sc in vms if sc.watcher is not None for ev in sc.watcher.events]


def _timed_out(vms: list[Scenario]) -> int:
    return sum(1 for ev in _events(vms) if isinstance(ev, SyncFailed)
               and ev.reason == FailureReason.SYNC_TIMED_OUT)


def _reissued(vms: list[Scenario]) -> int:
    """Plans published more than once (the planner re-issues a silent sync's plan)."""
    plans = [ev.sync_id for ev in _events(vms) if isinstance(ev, SyncPlanned)]
    return len(plans) - len(set(plans))


def _progress(sc: Scenario, sync_id: str) -> int:
    assert sc.watcher is not None
    return max((ev.bytes_done for ev in sc.watcher.events
                if isinstance(ev, SyncProgress) and str(ev.sync_id) == sync_id), default=0)


async def _close(vms: list[Scenario]) -> None:
    for sc in vms:
        await sc.close()


# -- 1. one shared pool, a member killed mid-copy, a member added -------------------------------
async def test_shared_pool_member_killed_mid_copy_and_member_added(
        fleet: Fleet, e2e_settings: Settings, sim: SimulatorControl, tmp_path: Path) -> None:
    t_start = time.monotonic()
    shared_root = tmp_path / "shared-replicas"
    base = _with_root(e2e_settings, shared_root)
    worker = base.model_copy(update={
        "pools": base.pools.model_copy(update={"default": "shared"})})
    fleet.start_worker(worker)
    for name in ("a", "b", "c"):
        fleet.start(name, fleet.member_settings(name, pool="shared", storage="shared",
                                                target_root=shared_root, state_root=tmp_path))
    vms: list[Scenario] = []
    try:
        for i in range(6):  # VM 0 has the large disk
            sizes = [32 * MiB, 8 * MiB] if i == 0 else [8 * MiB, 8 * MiB]
            vms.append(await vm_scenario(base, sim, tmp_path / f"vm-{i}", fleet.check,
                                         "e2e-pool", sizes, i))
        big_vm, big_key = vms[0], _keys(vms[0])[0]
        big_disk = _disk_key(big_vm, big_key)
        assert fleet.pipeline is not None
        fleet.pipeline.wait_worker_ready()
        await fleet.wait_group("shared", 3)

        cycles = [await _cycle(1, vms, _seed)]
        assert cycles[0].not_committed() == []
        assert {o.replication_type for _, o in cycles[0].commits()} == {"full"}
        assert _unequal(vms) == []
        cycles.append(await _cycle(2, vms, _scattered))
        assert _unequal(vms) == []

        # Cycle 3: the large disk gets 24 MiB of new data (about 8 s at the rate limit).
        for sc in vms:
            await sc.write(_scattered(sc) + (_dense(sc, big_key, 24) if sc is big_vm else []))
        c3 = await _snapshot_all(3, vms)
        snap = c3.snapshot_of(big_vm)
        w = big_vm.watcher
        assert w is not None
        await w.wait_for(lambda: big_key in w.plans(snap), 60, alive=fleet.check)
        sync_id = str(w.plans(snap)[big_key].sync_id)

        def running_somewhere() -> bool:
            return bool(fleet.who_started(sync_id)) and _progress(big_vm, sync_id) >= 4 * MiB

        await w.wait_for(lambda: running_somewhere() or big_key in w.outcomes(snap), 60,
                         alive=fleet.check)
        assert big_key not in w.outcomes(snap), "the large copy finished before the kill"
        (victim,) = fleet.who_started(sync_id)
        done_at_kill = _progress(big_vm, sync_id)
        fleet.kill(victim)  # SIGKILL mid-copy
        fleet.start("d", fleet.member_settings("d", pool="shared", storage="shared",
                                               target_root=shared_root, state_root=tmp_path))
        await _wait(c3)
        cycles.append(c3)
        assert _unequal(vms) == []
        await fleet.wait_group("shared", 3)  # b/c/d without the killed one

        cycles.append(await _cycle(4, vms, _scattered))
        assert _unequal(vms) == []
        cycles.append(await _cycle(5, vms, _scattered))
        assert _unequal(vms) == []

        # -- figures (measured before the assertions below, for the record) ------------------
        big_commit = w.outcomes(snap).get(big_key)
        owners = [m for m in fleet.who_started(sync_id) if m != victim]
        resumed = [c for m in owners for c in fleet.members[m].copies(big_disk)
                   if c.get("resumed_from", 0) > 0]
        later = [o for c in cycles[1:] for _, o in c.commits()]
        fulls_after_seed = sum(1 for o in later if o.replication_type == "full")
        commits = [o for c in cycles for _, o in c.commits()]
        # what the commits say they copied (a resumed sync counts the bytes its checkpoint
        # covers, copied by the killed member, once)
        copied = sum(o.bytes_copied for o in commits)
        # what the attempts that committed read from the snapshots (a resumed sync: only after
        # its checkpoint; what the killed attempt read past it is in no commit)
        read = sum(o.bytes_read or 0 for o in commits)
        # ideal: each disk's seeding reads its allocated areas once, each later sync its
        # changed areas once
        ideal = sum(o.bytes_changed or 0 for o in commits)
        figures = {
            "test": "shared_pool", "members": sorted(fleet.members), "killed": victim,
            "resumed_by": owners, "killed_at_bytes_done": done_at_kill,
            "resumed_from": resumed[-1]["resumed_from"] if resumed else 0,
            "resumed_commit_bytes_read": getattr(big_commit, "bytes_read", None),
            "resumed_commit_bytes_changed": getattr(big_commit, "bytes_changed", None),
            "max_snapshot_to_commit_s": round(max(x for c in cycles for x in c.latencies()), 1),
            "max_snapshot_to_commit_s_per_cycle": [round(max(c.latencies(), default=0), 1)
                                                   for c in cycles],
            "full_copies_after_seeding": fulls_after_seed,
            "sync_timed_out": _timed_out(vms), "plans_reissued": _reissued(vms),
            "not_committed": [x for c in cycles for x in c.not_committed()],
            "bytes_copied_by_commits": copied, "bytes_read_by_committing_attempts": read,
            "bytes_ideal": ideal,
            "copied_vs_ideal": round(copied / ideal, 3) if ideal else None,
            "runtime_s": round(time.monotonic() - t_start, 1),
        }
        print("\nPOOLS " + json.dumps(figures, separators=(",", ":")))

        assert figures["not_committed"] == []
        assert figures["sync_timed_out"] == 0
        assert fulls_after_seed == 0, [(o.disk.key, o.reason) for o in later
                                       if o.replication_type == "full"]
        assert isinstance(big_commit, ChangeIdCommitted)
        assert big_commit.replication_type == "incremental"
        # another member completed it, from the checkpoint the killed one left
        assert owners, f"no member but {victim} started {sync_id}"
        assert resumed, (f"{owners} did not resume {big_disk} from a checkpoint: "
                         f"{[fleet.members[m].copies(big_disk) for m in owners]}")
        assert big_commit.bytes_read is not None and big_commit.bytes_changed is not None
        assert big_commit.bytes_read < big_commit.bytes_changed, big_commit
    finally:
        await _close(vms)


# -- 2. two host-local pools: a pool's disks wait for their own copier ------------------------
async def test_host_local_pools_wait_for_their_own_copier(
        fleet: Fleet, e2e_settings: Settings, sim: SimulatorControl, tmp_path: Path) -> None:
    t_start = time.monotonic()
    roots = {p: tmp_path / f"replicas-{p}" for p in ("a", "b")}
    vms: dict[str, list[Scenario]] = {"a": [], "b": []}
    try:
        for i in range(4):
            pool = "a" if i < 2 else "b"
            vms[pool].append(await vm_scenario(_with_root(e2e_settings, roots[pool]), sim,
                                               tmp_path / f"vm-{i}", fleet.check, "e2e-local",
                                               [4 * MiB, 4 * MiB], 100 + i))
        everyone = vms["a"] + vms["b"]
        assign = tuple(PoolAssignment(vm=sc.vm.instance_uuid, pool=pool)
                       for pool, scs in vms.items() for sc in scs if sc.vm is not None)
        local = e2e_settings.model_copy(update={
            "streams": e2e_settings.streams.model_copy(update={
                "sync_timeout_s": LOCAL_TIMEOUT_S, "sync_check_interval_s": 0.5})})
        fleet.start_worker(local.model_copy(update={
            "pools": local.pools.model_copy(update={"assign": assign})}))
        for pool in ("a", "b"):
            fleet.start(pool, fleet.member_settings(pool, pool=pool, storage="host-local",
                                                    target_root=roots[pool], state_root=tmp_path,
                                                    base=local))
        assert fleet.pipeline is not None
        fleet.pipeline.wait_worker_ready()
        await fleet.wait_group("a", 1)
        await fleet.wait_group("b", 1)

        def only_own(c: Cycle) -> None:
            """Every plan went to its VM's pool, its replica is under that pool's root only, and
            no copier started a sync of the other pool."""
            for pool, other in (("a", "b"), ("b", "a")):
                started = fleet.members[other].started()
                for sc in vms[pool]:
                    assert sc.watcher is not None and sc.vm is not None
                    plans = sc.watcher.plans(c.snapshot_of(sc)).values()
                    assert {p.pool for p in plans} == {pool}
                    assert not any(str(p.sync_id) in started for p in plans)
                    assert not (roots[other] / sc.vm.instance_uuid).exists()

        c1 = await _cycle(1, everyone, _seed)
        assert c1.not_committed() == []
        assert {o.replication_type for _, o in c1.commits()} == {"full"}
        assert _unequal(everyone) == []
        only_own(c1)

        # Copier a goes away; both pools' VMs are snapshotted.
        fleet.stop("a")
        for sc in everyone:
            await sc.write(_scattered(sc))
        c2 = await _snapshot_all(2, everyone)
        t_snap = time.monotonic()
        await _wait(c2, vms["b"])
        # a's plans stay unserved for three silent-sync time-outs (and a wrong copier has
        # time to pick them up)
        await asyncio.sleep(max(0.0, 3 * LOCAL_TIMEOUT_S - (time.monotonic() - t_snap)))
        waiting = [(ev.disk.key, o) for sc, ev, o in c2.outcomes() if sc in vms["a"]]
        assert all(o is None for _, o in waiting), waiting  # no commit, no failure
        assert _reissued(vms["a"]) == 0
        assert _unequal(vms["b"]) == []
        a_down_s = time.monotonic() - t_snap
        t_restart = time.monotonic()
        fleet.start("a")  # the same host, state folder and target root
        await _wait(c2)
        a_back_s = time.monotonic() - t_restart
        assert _unequal(everyone) == []
        only_own(c2)

        c3 = await _cycle(3, everyone, _scattered)
        assert _unequal(everyone) == []
        only_own(c3)

        later = [o for c in (c2, c3) for _, o in c.commits()]
        figures = {
            "test": "host_local_pools",
            "max_snapshot_to_commit_s_per_cycle": [round(max(c.latencies(), default=0), 1)
                                                   for c in (c1, c2, c3)],
            "pool_a_unserved_s": round(a_down_s, 1),
            "pool_a_commits_after_restart_s": round(a_back_s, 1),
            "sync_timeout_s": LOCAL_TIMEOUT_S,
            "full_copies_after_seeding": sum(1 for o in later if o.replication_type == "full"),
            "not_committed": [x for c in (c1, c2, c3) for x in c.not_committed()],
            "sync_timed_out": _timed_out(everyone), "plans_reissued": _reissued(everyone),
            "runtime_s": round(time.monotonic() - t_start, 1),
        }
        print("\nPOOLS " + json.dumps(figures, separators=(",", ":")))
        assert figures["not_committed"] == []
        assert figures["full_copies_after_seeding"] == 0
        assert figures["sync_timed_out"] == 0
        # waiting for a pool is not silence, before or after its copier is back
        assert figures["plans_reissued"] == 0, "silent-sync re-issues although every sync had " \
            "a live copier reporting or waited for its pool (worker.log: 'silent sync reissued')"
    finally:
        await _close(vms["a"] + vms["b"])
