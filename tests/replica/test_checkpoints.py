"""Resume checkpoints kept with the replica record (consumers/replica/store.py,
consumers/copy/checkpoint.py), records of block/NBD targets in ``copier.record_dir``, and the
session's host rule on real records: another host's record in a host-local pool is refused
before anything is written; in a shared pool it is this replica's record."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from cbtstream.config import CopierSettings, TargetMapping
from consumers.copy.checkpoint import CheckpointError, CheckpointState
from consumers.copy.targets import FileTarget
from consumers.replica.guard import CopierHost
from consumers.replica.location import TargetResolver
from consumers.replica.session import ReplicaOnOtherHost, ReplicaSession
from consumers.replica.state import ReplicaState, ReplicaStatus, WritingSync, first_state
from consumers.replica.verify import find_records
from schemas import ReplicationType
from schemas.events import FailureReason
from tests.unit.test_replica_guard import PIPE, _plans

VM = "5012abcd-1111-2222-3333-444455556666"
KEY = f"{VM}/disk-2000"
SYNC = str(uuid.uuid4())
STATE = CheckpointState("plan-fingerprint", 64 << 20, 64 << 20, 0)


def _resolver(tmp_path: Path, *maps: TargetMapping, **kw: object) -> TargetResolver:
    return TargetResolver(CopierSettings(target_root=tmp_path / "r", state_dir=tmp_path / "s",
                                         targets=maps, **kw))  # type: ignore[arg-type]


def test_a_file_replicas_checkpoint_sits_beside_its_record(tmp_path: Path) -> None:
    loc = _resolver(tmp_path).locate(KEY)
    cp = loc.store.checkpoint(KEY, SYNC)
    assert cp.path == tmp_path / "r" / VM / f"disk-2000.img.checkpoint.{SYNC}"
    assert cp.load("plan-fingerprint") is None
    cp.save(STATE)
    assert sorted(os.listdir(tmp_path / "r" / VM)) == [cp.name]  # no temp file left
    assert not (tmp_path / "s").exists()  # nothing in the host-local state dir
    # another copier (another host of a shared pool) resumes from it
    again = _resolver(tmp_path).locate(KEY).store.checkpoint(KEY, SYNC)
    assert again.load("plan-fingerprint") == STATE
    assert again.load("another plan") is None  # different work: start over
    again.done()
    assert again.load("plan-fingerprint") is None and not cp.path.exists()
    again.done()  # twice is fine


def test_block_and_nbd_records_and_checkpoints_go_to_the_record_dir(tmp_path: Path) -> None:
    maps = (TargetMapping(disk=KEY, device="/dev/disk/by-id/vol-1"),
            TargetMapping(disk=f"{VM}/disk-2001", nbd="nbd://127.0.0.1:10809/x"))
    default = _resolver(tmp_path, *maps, device_allow=("/dev/disk/by-id/*",))
    assert default.locate(KEY).store.directory == tmp_path / "s" / "targets"
    shared = _resolver(tmp_path, *maps, device_allow=("/dev/disk/by-id/*",),
                       records_dir=tmp_path / "nfs" / "records")
    assert shared.state_root == tmp_path / "nfs" / "records"
    for key in (KEY, f"{VM}/disk-2001"):
        store = shared.locate(key).store
        assert store.directory == tmp_path / "nfs" / "records"
        cp = store.checkpoint(key, SYNC)
        cp.save(STATE)
        assert cp.path.parent == store.directory
        assert cp.path.name == f"{store.name}.checkpoint.{SYNC}"


def test_a_checkpoint_is_never_written_through_a_symlinked_directory(tmp_path: Path) -> None:
    resolver = _resolver(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / VM).symlink_to(elsewhere)
    cp = resolver.locate(KEY).store.checkpoint(KEY, SYNC)
    with pytest.raises(CheckpointError):
        cp.save(STATE)
    assert cp.load("plan-fingerprint") is None
    assert os.listdir(elsewhere) == []


def test_other_syncs_checkpoints_are_pruned_and_forget_drops_them_all(tmp_path: Path) -> None:
    store = _resolver(tmp_path).locate(KEY).store
    mine, old = SYNC, str(uuid.uuid4())
    for sync in (mine, old):
        store.checkpoint(KEY, sync).save(STATE)
    (store.directory / f".disk-2000.img.checkpoint.{old}.tmp123").write_bytes(b"{")  # torn save
    (store.directory / "disk-2000.img.state").write_bytes(b"{}")
    store.prune_checkpoints(mine)
    assert sorted(os.listdir(store.directory)) == [f"disk-2000.img.checkpoint.{mine}",
                                                   "disk-2000.img.state"]
    store.forget()
    assert os.listdir(store.directory) == []


async def test_host_local_refuses_another_hosts_record_and_shared_takes_it_over(
        tmp_path: Path) -> None:
    _, p2, p3 = _plans()
    resolver = _resolver(tmp_path)
    loc = resolver.locate(p3.disk.key)
    capacity = p3.disk.capacity_bytes
    opened = resolver.open(loc, capacity)  # the replica file exists (sparse)
    assert isinstance(opened, FileTarget)
    async with opened:
        pass
    target = loc.identity()
    assert target is not None
    writing = WritingSync(sync_id=p2.sync_id, generation=p2.generation,
                          replication_type=ReplicationType.FULL, base_change_id=None,
                          snapshot_taken_at=p2.snapshot_taken_at)
    record = first_state(PIPE, p3.disk.key, p3.disk.backing_uuid, capacity, target, writing,
                         "host-a")
    loc.store.save(record)
    loc.store.checkpoint(p3.disk.key, str(p2.sync_id)).save(STATE)
    before = {p.name: p.read_bytes() for p in loc.store.directory.iterdir()
              if not p.name.endswith(".img")}

    with pytest.raises(ReplicaOnOtherHost) as refused:
        await ReplicaSession.begin(loc, p3, PIPE, CopierHost("host-b", "p", "host-local"))
    assert refused.value.reason == FailureReason.REPLICA_ON_OTHER_HOST
    assert not refused.value.retriable
    assert "host 'host-a'" in str(refused.value) and "host 'host-b'" in str(refused.value)
    after = {p.name: p.read_bytes() for p in loc.store.directory.iterdir()
             if not p.name.endswith(".img")}
    assert after == before  # nothing written

    # a shared pool: another host's record is this replica's; marking dirty records the new
    # host, keeps the replica id and drops the checkpoint of the sync that can never resume
    session = await ReplicaSession.begin(loc, p3, PIPE, CopierHost("host-b", "p", "shared"))
    await session.mark_dirty(ReplicationType.FULL, target)
    saved = loc.store.load()
    assert isinstance(saved, ReplicaState)
    assert (saved.status, saved.host, saved.replica_id) == (
        ReplicaStatus.DIRTY, "host-b", record.replica_id)
    assert not any(".checkpoint." in n for n in os.listdir(loc.store.directory))
    # `cbtstream targets` and verify find it where the configuration puts it
    assert [f.disk_key for f in find_records(resolver)] == [p3.disk.key]
