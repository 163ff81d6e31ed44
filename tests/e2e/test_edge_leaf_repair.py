"""Issue 24, item 1, on the real pipeline (Kafka, Faust, the simulator, nbdkit, the copier):
bytes flipped in a file replica behind the copier's back, inside a unit of the hash tree that
the next incremental writes only in part, must not be certified by that sync's commit.

Before the fix the sync read the unit's kept bytes back, corrupt ones included, and hashed them
into the new tree: the commit's ``replica_digest`` described the corrupt replica and ``cbtstream
verify`` said equal while the replica differed from the snapshot. Now the sync proves those bytes
against the base tree first; unproven, the unit is copied whole from the snapshot and the commit
says ``incremental`` / ``replica_mismatch``. The control disk has bytes flipped where its sync
does not write: left for ``verify``, as before.

The simulator's CBT blocks are 64 KiB, like the tree's leaves (issue 24, item 2), so its changed
areas never cover a leaf in part (``tests/copy/test_edge_leaves.py`` covers edge leaves with
smaller areas). The unit written in part here is a whole 1 MiB piece: disk a's leaf file is
lost with the corruption, so the sync cannot vouch for the leaf entries of the piece it writes
into and proves that piece whole, as it must.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cbtctl.demo.processes import child_env
from cbtctl.demo.scenario import Scenario, random_name
from cbtctl.demo.workload import KiB, MiB, Write, initial_fill, scattered
from cbtstream.config import Settings
from schemas.events import ChangeIdCommitted
from tests.copy.treeref import root_of
from tests.e2e.conftest import Pipeline

pytestmark = pytest.mark.integration

SIZES = [8 * MiB, 4 * MiB + 64 * 1024]


@pytest.fixture
def e2e_settings(e2e_settings: Settings) -> Settings:
    # snapshots are kept so `verify --source` can read the one the replicas hold
    streams = e2e_settings.streams.model_copy(update={"remove_snapshots": False})
    return e2e_settings.model_copy(update={"streams": streams})


def _flip(path: Path, offset: int, n: int = 3) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        old = fh.read(n)
        fh.seek(offset)
        fh.write(bytes(x ^ 0xFF for x in old))


def _verify(settings: Settings, *args: str) -> tuple[int, list[dict[str, object]]]:
    out = subprocess.run([sys.executable, "-m", "cbtctl.cli", "verify", "--json", *args],
                         env=child_env(settings), capture_output=True, text=True, timeout=120)
    return out.returncode, [json.loads(line) for line in out.stdout.splitlines()
                            if line.startswith("{")]


async def test_flip_in_a_leaf_the_sync_rewrites_in_part_is_repaired(
    scenario: Scenario, pipeline: Pipeline, e2e_settings: Settings,
) -> None:
    pipeline.start_copier()
    vm = await scenario.create_vm(random_name("e2e-edge"), SIZES)
    a, b = (d.key for d in vm.disks)
    key_a, key_b = f"{vm.instance_uuid}/disk-{a}", f"{vm.instance_uuid}/disk-{b}"
    rng = scenario.rng
    # piece 3 of disk a holds data in the base (a hole's zero entry would vouch for its leaves)
    fill = [w for d in vm.disks for w in initial_fill(rng, d.key, d.capacity)]
    good = [
        await scenario.cycle(1, [*fill, Write(a, 3 * MiB, rng.randbytes(MiB))]),
        await scenario.cycle(2, [w for d in vm.disks for w in scattered(rng, d.key,
                                                                        d.capacity)]),
    ]
    assert all(r.verified for c in good for r in c.rows), [c.rows for c in good]
    assert {r.replication_type for r in good[1].rows} == {"incremental"}

    # behind the copier's back: disk a in piece 3, which the next sync writes only in part
    # (4 KiB at 3.5 MiB: one 64 KiB CBT block, leaf 56), and its leaf file lost; disk b in
    # piece 0, which its sync does not touch
    _flip(scenario.replica(a), 3 * MiB + 100)
    lost = list(scenario.replica(a).parent.glob(scenario.replica(a).name + ".leaves.*"))
    assert len(lost) == 1
    lost[0].unlink()
    _flip(scenario.replica(b), 100)
    c3 = await scenario.cycle(3, [Write(a, 3 * MiB + 512 * KiB, rng.randbytes(4 * KiB)),
                                  Write(b, 2 * MiB + 300 * KiB, rng.randbytes(4 * KiB))])
    rows = {r.disk_id: (r.replication_type, r.reason, r.verified) for r in c3.rows}
    # disk a: the replica equals the snapshot again, and the commit says what was found
    assert rows[f"disk-{a}"] == ("incremental", "replica_mismatch", True), rows
    # disk b (control): not touched, not repaired, not certified either (see verify below)
    assert rows[f"disk-{b}"] == ("incremental", "previous_commit", False), rows
    assert scenario.watcher is not None
    outcomes = scenario.watcher.outcomes(c3.vm_snapshot)
    commit_a, commit_b = outcomes[a], outcomes[b]
    assert isinstance(commit_a, ChangeIdCommitted) and isinstance(commit_b, ChangeIdCommitted)
    # the new root is the snapshot's, computed independently from the snapshot's bytes
    assert commit_a.replica_digest == root_of(scenario.model(a).read_bytes())
    assert commit_b.replica_digest == root_of(scenario.model(b).read_bytes())
    log = (pipeline.logs / "copier-1.log").read_text()
    assert f"{key_a}: replica corrupt in piece 3 " in log and key_b + ": replica corrupt" not in log

    rc, out = _verify(e2e_settings, "--disk", key_a, "--source")
    assert rc == 0 and out[0]["result"] == "equal", out
    assert out[0]["replica_digest"] == out[0]["source_digest"] == commit_a.replica_digest, out
    rc, out = _verify(e2e_settings, "--disk", key_b)
    assert rc == 1 and out[0]["result"] == "mismatch", out
