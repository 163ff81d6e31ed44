"""Points through the order of effects a sync follows: after random cycles every point reads
back equal to its model, byte for byte; resumes and interrupted commits keep that true."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from cbtstream.config import PointsPolicy
from consumers.points.catalogue import CatalogueCorrupt, Held, file_name, load
from consumers.points.undo import UndoWriter
from tests.unit.points.sim import T0, Sim

CAP = 1 << 20


@pytest.mark.parametrize("seed", range(8))
def test_every_point_reads_back_after_random_cycles(tmp_path: Path, seed: int) -> None:
    sim = Sim(tmp_path, CAP + seed * 4099, seed)  # capacities that are not leaf multiples
    first = sim.run_cycle()  # the first copy: nothing earlier to save
    assert sim.chain.load().point(first).store is None
    for _ in range(7):
        sim.run_cycle(groups=sim.rnd.randrange(1, 5), most=sim.rnd.choice([512, 70_000]))
    sim.check_all()
    # ranges that do not start or end on a chunk
    for pid, model in sim.models.items():
        reader = sim.chain.reader(pid, sim.read_live)
        for offset, length in sim.areas(10, 200_000):
            assert reader.read(offset, length) == model[offset : offset + length]
        reader.close()


def test_a_point_stays_readable_while_a_sync_overwrites_the_replica(tmp_path: Path) -> None:
    sim = Sim(tmp_path, CAP, 1)
    sim.run_cycle()
    live = sim.run_cycle()
    writer = sim.begin()
    sim.write(writer, sim.areas(6, 50_000))
    assert sim.read_point(live) == sim.models[live]  # its store (unsealed) + the replica
    sim.commit(writer)
    sim.check_all()


def test_a_resumed_sync_keeps_saving_into_the_same_store(tmp_path: Path) -> None:
    sim = Sim(tmp_path, CAP, 2)
    sim.run_cycle()
    live = sim.run_cycle()
    writer = sim.begin()
    sim.write(writer, sim.areas(4, 60_000))
    assert writer is not None
    # crash: old bytes of the next group saved and synced, the write half done
    group = sim.areas(4, 60_000)
    for offset, length in group:
        writer.save_many([(offset, sim.read_live(offset, length))])
    writer.sync()
    offset, length = group[0]
    sim.replica[offset : offset + length // 2] = b"\xee" * (length // 2)
    writer.close()
    # the resume: the same sync begins again and rewrites everything
    writer = sim.chain.begin(f"sync-{sim.cycle}", f"cid-{sim.cycle}", sim.at(), sim.held)
    sim.write(writer, group)
    sim.commit(writer)
    assert sim.read_point(live) == sim.models[live]
    sim.check_all()


def test_a_full_copy_after_an_abandoned_sync_keeps_the_first_bytes(tmp_path: Path) -> None:
    sim = Sim(tmp_path, CAP, 3)
    sim.run_cycle()
    live = sim.run_cycle()
    writer = sim.begin()
    sim.write(writer, sim.areas(5, 80_000))
    assert writer is not None
    writer.close()  # that sync never resumes: the fence lets a full copy write next
    writer = sim.begin()  # another sync id: replaces the pending point
    sim.write(writer, [(0, CAP)])
    sim.commit(writer)
    cat = sim.chain.load()
    assert [p.sync_id for p in cat.points][-1] == f"sync-{sim.cycle}"
    assert sim.read_point(live) == sim.models[live]
    assert cat.point(live).undo_bytes == CAP


def test_a_commit_interrupted_after_the_record_was_marked_clean(tmp_path: Path) -> None:
    sim = Sim(tmp_path, CAP, 4)
    sim.run_cycle()
    live = sim.run_cycle()
    writer = sim.begin()
    sim.write(writer, sim.areas(3, 30_000))
    assert writer is not None
    writer.close()  # crash after "mark clean", before commit
    root = f"root-{sim.cycle}"
    sim.held = Held(f"sync-{sim.cycle}", f"cid-{sim.cycle}", root, sim.at())
    cat = sim.chain.recover(sim.held)  # the next sync's begin does this
    assert cat.live is not None and cat.live.root_digest == root
    assert cat.point(live).sealed
    sim.models[cat.live.id] = bytes(sim.replica)
    sim.run_cycle()
    sim.check_all()


def test_a_commit_interrupted_after_the_seal(tmp_path: Path) -> None:
    sim = Sim(tmp_path, CAP, 5)
    sim.run_cycle()
    live = sim.run_cycle()
    writer = sim.begin()
    sim.write(writer, sim.areas(3, 30_000))
    assert writer is not None
    previous = sim.chain.load().point(live)
    assert previous.root_digest is not None
    writer.seal(previous.root_digest, previous.change_id)
    writer.close()  # crash before the catalogue write
    sim.held = Held(f"sync-{sim.cycle}", f"cid-{sim.cycle}", f"root-{sim.cycle}", sim.at())
    cat = sim.chain.recover(sim.held)
    assert cat.point(live).sealed and cat.point(live).undo_bytes > 0
    assert cat.live is not None
    sim.models[cat.live.id] = bytes(sim.replica)
    sim.check_all()


def test_a_catalogue_out_of_step_with_the_record_is_reset(tmp_path: Path) -> None:
    sim = Sim(tmp_path, CAP, 6)
    for _ in range(3):
        sim.run_cycle()
    other = Held("another-sync", "cid-x", "root-x", T0)
    cat = sim.chain.recover(other)
    assert [(p.sync_id, p.store) for p in cat.points] == [("another-sync", None)]
    assert not [f for f in tmp_path.iterdir() if ".undo." in f.name]
    assert sim.chain.recover(None).points == ()  # no clean sync: no point


def test_a_damaged_catalogue_is_reset(tmp_path: Path) -> None:
    sim = Sim(tmp_path, CAP, 7)
    sim.run_cycle()
    sim.run_cycle()
    path = tmp_path / file_name(sim.chain.name)
    path.write_bytes(path.read_bytes().replace(b"cid-1", b"cid-9"))
    with pytest.raises(CatalogueCorrupt):
        load(tmp_path, sim.chain.name)
    cat = sim.chain.recover(sim.held)
    assert [p.sync_id for p in cat.points] == ["sync-2"]


def test_forget(tmp_path: Path) -> None:
    sim = Sim(tmp_path, CAP, 8)
    for _ in range(3):
        sim.run_cycle()
    sim.chain.forget()
    assert sim.chain.load().points == ()
    assert not [f for f in tmp_path.iterdir() if ".undo." in f.name]


def test_ten_cycles_with_a_count_of_four(tmp_path: Path) -> None:
    """The issue's check: exactly 4 points remain, the oldest gone, their undo data
    reclaimed, and every remaining point reads back."""
    sim = Sim(tmp_path, CAP, 9)
    policy = PointsPolicy(count=4)
    reclaimed = 0
    for _ in range(10):
        sim.run_cycle()
        before = sum(p.undo_bytes for p in sim.chain.load().points)
        report = sim.chain.prune(policy, sim.at())
        reclaimed += report.reclaimed_bytes
        assert report.reclaimed_bytes == before - sum(p.undo_bytes
                                                      for p in report.catalogue.points)
    cat = sim.chain.load()
    assert [p.id for p in cat.points] == [7, 8, 9, 10]
    assert reclaimed > 0
    stores = {f.name.split(".")[3] for f in tmp_path.iterdir() if ".undo." in f.name}
    assert stores == {p.store for p in cat.points if p.store}
    assert len(stores) == 3
    sim.check_all()


@pytest.mark.parametrize("seed", range(6))
def test_dropping_middle_points_keeps_every_other_point(tmp_path: Path, seed: int) -> None:
    sim = Sim(tmp_path, CAP, 100 + seed)
    for _ in range(9):
        sim.run_cycle(most=sim.rnd.choice([3000, 100_000]))
    cat = sim.chain.load()
    ids = [p.id for p in cat.complete][:-1]
    drop = frozenset(sim.rnd.sample(ids, sim.rnd.randrange(1, len(ids))))
    from consumers.points.prune import drop_points

    report = drop_points(tmp_path, sim.chain.name, cat, drop)
    assert report.dropped == tuple(sorted(drop))
    assert {p.id for p in report.catalogue.points} == {p.id for p in cat.points} - drop
    sim.check_all()
    # and the chain goes on
    sim.run_cycle()
    sim.check_all()


def test_age_limit(tmp_path: Path) -> None:
    sim = Sim(tmp_path, CAP, 11)
    for _ in range(6):
        sim.run_cycle()  # 6 hours apart
    report = sim.chain.prune(PointsPolicy(count=10, max_age=timedelta(hours=13)), sim.at())
    assert report.dropped == (1, 2, 3)
    sim.check_all()


def test_a_first_copy_has_no_writer(tmp_path: Path) -> None:
    sim = Sim(tmp_path, CAP, 12)
    assert sim.begin() is None
    sim.commit(None)
    writer = sim.begin()
    assert isinstance(writer, UndoWriter)
    writer.close()


def test_points_enabled_on_a_replica_with_history(tmp_path: Path) -> None:
    """No catalogue yet, but the record holds a clean sync: that is the first point, and the
    next sync saves what it overwrites."""
    sim = Sim(tmp_path, CAP, 13)
    sim.held = Held("earlier", "cid-0", "root-0", T0)
    writer = sim.begin()
    assert writer is not None
    first = sim.chain.load().live
    assert first is not None and first.sync_id == "earlier"
    sim.models[first.id] = bytes(sim.replica)
    sim.write(writer, sim.areas(4, 50_000))
    sim.commit(writer)
    sim.check_all()


@pytest.mark.parametrize("seed", range(4))
def test_a_rollback_makes_a_point_live_and_older_points_still_read(tmp_path: Path,
                                                                    seed: int) -> None:
    """failover --at: the bytes the point's stores hold (``differs``) written back make the
    replica the point; after ``roll_back`` it is the live point, newer points are gone and every
    older point still reads back equal to its model (their stores are relative to it)."""
    sim = Sim(tmp_path, CAP + seed * 4099, seed)
    ids = [sim.run_cycle(groups=sim.rnd.randrange(1, 4), most=sim.rnd.choice([512, 70_000]))
           for _ in range(6)]
    target = ids[3]
    reader = sim.chain.reader(target, sim.read_live)
    for start, end in reader.differs():
        sim.replica[start:end] = reader.read(start, end - start)
    reader.close()
    assert bytes(sim.replica) == sim.models[target]
    cat = sim.chain.roll_back(target)
    assert cat.live is not None and cat.live.id == target and cat.live.store is None
    assert [p.id for p in cat.points] == ids[:4]
    for pid in ids[:4]:
        assert sim.read_point(pid) == sim.models[pid], pid
    with pytest.raises(KeyError):
        sim.chain.load().point(ids[4])
