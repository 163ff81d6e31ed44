"""The copier's side of restore points: reconciling with a dirty record (a resumed or replacing
sync, a full copy whose record names no clean sync), the target that saves old bytes before
every write, the record-to-points mapping, point selection and the settings round trip."""

from __future__ import annotations

import asyncio
import os
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from cbtstream.config import PointsPolicy, Settings, to_env
from consumers.points import catalogue as cat_mod
from consumers.points.catalogue import Held, Step
from consumers.points.chain import PointChain, forget_points
from consumers.points.saving import ZERO_GROUP, SavingTarget
from consumers.points.undo import store_of
from consumers.replica.export import tree_version
from consumers.replica.points import held_of, writing_of
from consumers.replica.state import (
    HeldSync,
    ReplicaState,
    ReplicaStatus,
    TargetIdentity,
    TargetKind,
    Unknown,
    WritingSync,
)
from schemas.events import ReplicationType
from tests.unit.points.sim import T0, Sim

CAP = 1 << 20


def _cat(*points: cat_mod.Point) -> cat_mod.Catalogue:
    return cat_mod.Catalogue(disk_key="vm/disk-1", capacity=CAP, next_id=10, points=points)


def _done(pid: int, sync: str) -> cat_mod.Point:
    return cat_mod.Point(id=pid, sync_id=sync, change_id=f"c{pid}", committed_at=T0,
                         root_digest=f"r{pid}", vm_snapshot=f"snapshot-{pid}")


def _pending(pid: int, sync: str) -> cat_mod.Point:
    return cat_mod.Point(id=pid, sync_id=sync, change_id=f"c{pid}")


HELD_A = Held("a", "c1", "r1", T0)


def test_reconcile_with_a_dirty_record() -> None:
    chain = _cat(_done(1, "a"), _pending(2, "b"))
    # the interrupted sync b resumes: its record is dirty with b and still holds a
    assert cat_mod.reconcile(chain, HELD_A, "b") is Step.NONE
    # a full copy b: its dirty record holds nothing, the live point is what it started from
    assert cat_mod.reconcile(chain, None, "b") is Step.NONE
    # the record is dirty with a sync the catalogue does not know: it wrote without saving
    assert cat_mod.reconcile(chain, HELD_A, "x") is Step.RESET
    assert cat_mod.reconcile(chain, None, "x") is Step.RESET
    # dirty, and the live point is not the record's clean sync
    assert cat_mod.reconcile(chain, Held("z", "c", "r", T0), "b") is Step.RESET
    # no catalogue yet and a dirty record: nothing to reset, no first point either
    assert cat_mod.reconcile(_cat(), HELD_A, "b") is Step.NONE
    # clean records as before
    assert cat_mod.reconcile(chain, HELD_A) is Step.NONE
    assert cat_mod.reconcile(chain, Held("b", "c2", "r2", T0)) is Step.FINISH


def test_points_enabled_while_a_sync_was_interrupted_make_no_first_point(tmp_path: Path) -> None:
    chain = PointChain(tmp_path, "disk-1.img", "vm/disk-1", CAP)
    # the record holds a but is dirty with x (interrupted before points were enabled): the
    # replica is not a, so a cannot be a point
    assert chain.begin("y", "c-y", None, HELD_A, "x") is None
    cat = chain.load()
    assert cat.live is None and cat.pending is not None and cat.pending.sync_id == "y"


def test_full_copy_resume_keeps_the_points(tmp_path: Path) -> None:
    sim = Sim(tmp_path, 256 * 1024, seed=5)
    for _ in range(2):
        sim.run_cycle()
    # a full copy begins: the record is clean with the last sync...
    sim.cycle += 1
    sync = f"sync-{sim.cycle}"
    writer = sim.chain.begin(sync, f"cid-{sim.cycle}", sim.at(), sim.held)
    assert writer is not None
    sim.write(writer, [(0, 100_000)])
    writer.close()  # killed
    # ...then marked dirty with no clean sync (a full copy drops the held one): the resume
    # gets the same store back and the earlier points survive
    again = sim.chain.begin(sync, f"cid-{sim.cycle}", sim.at(), None, sync)
    assert again is not None and again.store == writer.store
    assert again.coverage.covers(0, 100_000)
    sim.write(again, [(0, sim.capacity)])  # the full copy rewrites everything
    sim.commit(again)
    sim.check_all()
    assert len(sim.chain.load().complete) == 3


class MemTarget:
    """A target in memory that records the order of its effects."""

    def __init__(self, data: bytearray, log: list[str]) -> None:
        self.data = data
        self.log = log

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def max_request(self) -> int:
        return 1 << 20

    async def write(self, offset: int, buf: memoryview) -> None:
        self.log.append(f"write {offset}")
        self.data[offset : offset + len(buf)] = buf

    async def zero(self, offset: int, length: int) -> None:
        self.log.append(f"zero {offset}")
        self.data[offset : offset + length] = bytes(length)

    async def flush(self) -> None:
        self.log.append("flush")

    async def read_into(self, offset: int, buf: memoryview) -> None:
        buf[:] = self.data[offset : offset + len(buf)]


def test_saving_target_saves_durably_before_each_write(tmp_path: Path) -> None:
    sim = Sim(tmp_path, 3 * ZERO_GROUP, seed=9)
    sim.run_cycle(groups=1)
    sim.cycle += 1
    writer = sim.chain.begin(f"sync-{sim.cycle}", "c", sim.at(), sim.held)
    assert writer is not None
    log: list[str] = []
    inner = MemTarget(sim.replica, log)
    synced = writer.sync

    def sync() -> None:
        synced()
        log.append(f"sync {writer.entries}")

    writer.sync = sync  # type: ignore[method-assign]
    saved = writer.save_many
    saves: list[tuple[int, int, int]] = []  # (log index, start, end) of each group appended

    def save_many(items: list[tuple[int, memoryview]]) -> int:
        saves.append((len(log), items[0][0], items[-1][0] + len(items[-1][1])))
        log.append("save")
        return saved(items)

    writer.save_many = save_many  # type: ignore[method-assign,assignment]
    target = SavingTarget(inner, writer)
    before = bytes(sim.replica)
    concurrent: list[int] = []

    async def run() -> None:
        await target.write(4096, memoryview(b"\x01" * 5000))
        await target.write(4096, memoryview(b"\x02" * 10))  # saved already: first bytes win
        await target.zero(ZERO_GROUP - 10, ZERO_GROUP + 20)  # two groups of zero
        syncs = target.syncs
        await asyncio.gather(*(target.write(i * 70_000 + 2 * ZERO_GROUP, memoryview(
            os.urandom(60_000))) for i in range(8)))
        concurrent.append(target.syncs - syncs)
        await target.flush()

    asyncio.run(run())
    # group commit: the eight writes in flight shared their syncs...
    assert 1 <= concurrent[0] < 8, concurrent
    # ...and each was written only after a sync that started after its own group was appended
    for at, entry in enumerate(log):
        if not entry.startswith("write "):
            continue
        offset = int(entry.split()[1])
        mine = [i for i, start, end in saves if start <= offset + 10 and offset < end]
        if mine:
            assert any(e.startswith("sync") for e in log[mine[-1]:at]), (offset, log)
    # every write and zero came after a sync that made its old bytes durable
    first_write = log.index("write 4096")
    assert log[first_write - 1].startswith("sync")
    zeros = [i for i, e in enumerate(log) if e.startswith("zero")]
    assert len(zeros) == 2 and all(log[i - 1].startswith("sync") for i in zeros)
    assert log.count("write 4096") == 2 and not log[log.index("write 4096", first_write + 1)
                                                     - 1].startswith("sync")
    # (the first of the eight overlaps the zero run by 10 bytes, saved once)
    assert target.saved_bytes == 5000 + ZERO_GROUP + 20 + 8 * 60_000 - 10
    sim.commit(writer)
    point = sim.chain.load().complete[-2].id
    assert sim.read_point(point) == before
    sim.check_all()


def test_record_to_points() -> None:
    sync = uuid.uuid4()
    target = TargetIdentity(kind=TargetKind.FILE, location="/r/x.img", size=CAP)
    held = HeldSync(sync_id=sync, generation=3, change_id="c3", vm_snapshot="snapshot-9",
                    snapshot_taken_at=T0, replica_digest="blake3tree2:1:2:ab",
                    tree_file="x.img.pieces.3", result={})
    at = datetime(2024, 5, 1, tzinfo=UTC)
    clean = ReplicaState(pipeline="p", disk_key="vm/disk-1", backing_uuid="b", capacity_bytes=CAP,
                         target=target, status=ReplicaStatus.CLEAN, held=held, updated_at=at)
    assert held_of(clean) == Held(str(sync), "c3", "blake3tree2:1:2:ab", at, T0, "snapshot-9")
    assert writing_of(clean) is None
    w = WritingSync(sync_id=uuid.uuid4(), generation=4, replication_type=ReplicationType.FULL,
                    base_change_id=None, snapshot_taken_at=None)
    dirty = clean.dirty(w, target, "h").model_copy(update={"held": None})
    assert held_of(dirty) is None and writing_of(dirty) == str(w.sync_id)
    assert held_of(Unknown(detail="torn")) is None and writing_of(None) is None


def test_select_and_tree_version() -> None:
    cat = _cat(_done(1, "a"), _done(2, "b"), _pending(3, "c"))
    assert cat.select("1") == cat.points[0]
    assert cat.select("snapshot-2") == cat.points[1]
    assert cat.select("b") == cat.points[1] and cat.select("c1") == cat.points[0]
    assert cat.select("c") is None and cat.select("3") is None  # pending: not a point yet
    assert tree_version("blake3tree2:65536:1048576:ab") == 2
    assert tree_version("blake3tree:1048576:ab") == 1


def test_forget_points_removes_catalogue_and_stores(tmp_path: Path) -> None:
    sim = Sim(tmp_path, 128 * 1024, seed=2)
    for _ in range(3):
        sim.run_cycle()
    name = "disk-2000.img"
    assert any(store_of(name, e) for e in os.listdir(tmp_path))
    forget_points(tmp_path, name)
    assert not any(store_of(name, e) for e in os.listdir(tmp_path))
    assert not (tmp_path / f"{name}.points").exists()


def test_points_settings_round_trip(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not Settings().points.keeps_history
    s = Settings(points=PointsPolicy(count=4, daily=7, max_age=timedelta(days=30, seconds=1.5)))
    for k in [k for k in os.environ if k.startswith("CBTSTREAM_")]:
        monkeypatch.delenv(k)
    for k, v in to_env(s).items():
        monkeypatch.setenv(k, v)
    assert Settings().points == s.points
    monkeypatch.setenv("CBTSTREAM_POINTS__MAX_AGE", "P30D")
    assert Settings().points.max_age == timedelta(days=30)
