"""Issue 24, item 2, on the real pipeline (Kafka, Faust, the simulator, nbdkit, the copier): the
first incremental after the upgrade converts a replica's version 1 hash tree.

Two disks whose records are rewritten between cycles as an older copier left them (a version 1
tree file and root, no pieces or leaf file). Disk a's replica is intact: its next sync reads it
once, proves it against the version 1 root and stays incremental, and the commit names the
version 2 root of the snapshot. Disk b's replica has a byte flipped behind the copier's back:
the proof fails, and its sync is full with ``replica_mismatch``. Both replicas equal their
snapshot byte for byte afterwards, and ``cbtstream verify`` says equal.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from cbtctl.demo.processes import child_env
from cbtctl.demo.scenario import Scenario, files_equal, random_name
from cbtctl.demo.workload import MiB, initial_fill, scattered
from cbtstream.config import Settings
from consumers.replica.state import ReplicaState
from consumers.replica.store import ReplicaStore
from schemas.events import ChangeIdCommitted
from tests.copy.treeref import leaves_of_v1, root_of, root_of_v1
from tests.e2e.conftest import Pipeline

pytestmark = pytest.mark.integration

SIZES = [6 * MiB, 4 * MiB + 64 * 1024]


def _as_written_by_version_1(replica: Path) -> None:
    """The replica's record and tree as a copier before version 2 wrote them."""
    store = ReplicaStore(replica.parent, replica.name)
    record = store.load()
    assert isinstance(record, ReplicaState) and record.held is not None
    data = replica.read_bytes()
    store.prune_trees()
    name = f"{store.name}.tree.{record.held.generation}"
    (replica.parent / name).write_bytes(
        struct.pack(">8sQQ", b"CBTTREE1", len(data), MiB) + b"".join(leaves_of_v1(data)))
    held = record.held.model_copy(update={"replica_digest": root_of_v1(data), "tree_file": name})
    store.save(record.model_copy(update={"held": held}))


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        old = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([old[0] ^ 0xFF]))


async def test_first_incremental_after_the_upgrade_converts_the_tree(
    scenario: Scenario, pipeline: Pipeline, e2e_settings: Settings,
) -> None:
    pipeline.start_copier()
    vm = await scenario.create_vm(random_name("e2e-tree2"), SIZES)
    a, b = (d.key for d in vm.disks)
    rng = scenario.rng
    first = await scenario.cycle(1, [w for d in vm.disks for w in initial_fill(rng, d.key,
                                                                            d.capacity)])
    assert all(r.verified for r in first.rows), first.rows

    # between two syncs, as an older copier left the records; disk b also bit-rotted
    _as_written_by_version_1(scenario.replica(a))
    _as_written_by_version_1(scenario.replica(b))
    _flip(scenario.replica(b), 3 * MiB + 5)
    second = await scenario.cycle(2, [w for d in vm.disks for w in scattered(rng, d.key,
                                                                             d.capacity)])
    rows = {r.disk_id: (r.replication_type, r.reason, r.verified) for r in second.rows}
    assert rows[f"disk-{a}"] == ("incremental", "previous_commit", True), rows
    assert rows[f"disk-{b}"] == ("full", "replica_mismatch", True), rows
    assert scenario.watcher is not None
    outcomes = scenario.watcher.outcomes(second.vm_snapshot)
    for key in (a, b):
        commit = outcomes[key]
        assert isinstance(commit, ChangeIdCommitted)
        assert files_equal(scenario.replica(key), scenario.model(key))
        assert commit.replica_digest == root_of(scenario.model(key).read_bytes())
    names = sorted(p.name for p in scenario.replica(a).parent.iterdir())
    assert not [n for n in names if ".tree." in n or n.endswith(".undo")], names
    log = (pipeline.logs / "copier-1.log").read_text()
    assert log.count("replica hash tree converted to version 2") == 1

    out = subprocess.run([sys.executable, "-m", "cbtctl.cli", "verify", "--json", "--vm",
                          vm.instance_uuid], env=child_env(e2e_settings), capture_output=True,
                         text=True, timeout=120)
    results = [json.loads(line)["result"] for line in out.stdout.splitlines()
               if line.startswith("{")]
    assert out.returncode == 0 and results == ["equal", "equal"], out.stdout + out.stderr
