"""Crash tests: SIGKILL of the copier and of the Faust worker at random points of real syncs.

Checked after every kill, for every lane:

* no change ID is committed before its data is on the replica: each ``ChangeIdCommitted`` is
  compared byte for byte with the snapshot's model the moment it is observed (CommitAuditor);
* every replica equals its snapshot after every cycle;
* the audit trail has no contradiction: one distinct commit per sync, republished commits are
  the same fact, no sync both committed and failed;
* a sync killed after a saved checkpoint resumes from it (``resumed_from``), never starts over;
* lineage: cycle 1 full, every later cycle incremental from the previous commit of the same disk
  (a crash never turns into a silent full copy).
"""

from __future__ import annotations

import asyncio
import time

import pytest

from cbtctl.demo.scenario import random_name
from tests.hardening.conftest import LaneFactory
from tests.hardening.harness import RATE, Lane

pytestmark = pytest.mark.integration


def _report(lanes: list[Lane], seconds: float) -> str:
    kills = [k for lane in lanes for k in lane.kills]
    resumed = sum(1 for k in kills for d, v in k.checkpoints.items()
                  if v > 0 and k.resumed.get(d, 0) > 0)
    mid = sum(1 for k in kills if k.checkpoints)
    after = sum(1 for k in kills if k.outcomes_before == len(lanes[0].keys))
    checked = sum(lane.auditor.checked for lane in lanes)
    dups = sum(lane.auditor.duplicates for lane in lanes)
    return (f"{len(kills)} kills in {seconds:.0f}s: {mid} left checkpoints, {resumed} disk "
            f"syncs resumed from one, {after} after every outcome; {checked} commits verified "
            f"on arrival, {dups} republished")


async def _run_lane(lane: Lane, cycles: int, kill: str) -> None:
    await lane.start(random_name(f"crash-{lane.name}"))
    for n in range(1, cycles + 1):
        await lane.cycle(n, kill=kill)


def _problems(lane: Lane) -> list[str]:
    return [*lane.auditor.problems, *lane.lineage_problems(), *lane.resume_problems(),
            *(f"SyncFailed {f.reason}: {f.detail[:200]}" for f in lane.auditor.failures)]


#: Read rate of the copier kill tests. The copier copies a VM's three disks at once (nine
#: copies across the lanes on a small machine), and the first part of a second of each copy
#: (nbdkit's start, the changed areas) leaves no checkpoint; at half the lanes' rate the copy
#: phase is long enough for most kills, drawn over the expected copy time, to land mid-copy.
KILL_RATE = RATE // 2


async def _copier_kills(make_lane: LaneFactory, lanes: int, cycles: int, seed: int) -> None:
    t0 = time.monotonic()
    all_lanes = [await make_lane(f"l{i}", seed + i, rate=KILL_RATE) for i in range(lanes)]
    await asyncio.gather(*(_run_lane(lane, cycles, "copier") for lane in all_lanes))
    summary = _report(all_lanes, time.monotonic() - t0)
    print(summary)
    for lane in all_lanes:
        assert _problems(lane) == [], (lane.name, _problems(lane))
        assert len(lane.kills) == cycles
    assert sum(len(lane.kills) for lane in all_lanes) >= lanes * cycles
    # the kills really landed mid-copy: most left a checkpoint that a later run resumed from
    assert sum(1 for lane in all_lanes for k in lane.kills if k.checkpoints) >= lanes * cycles // 3


async def test_copier_sigkill_during_full_and_incremental_syncs(make_lane: LaneFactory) -> None:
    """21 kills: 3 lanes of a 3-disk VM, 7 cycles each (1 full, 6 incremental), one SIGKILL of
    the copier per cycle after a random delay between 0 and the expected copy time."""
    await _copier_kills(make_lane, lanes=3, cycles=7, seed=20240611)


@pytest.mark.soak
async def test_copier_sigkill_soak(make_lane: LaneFactory) -> None:
    await _copier_kills(make_lane, lanes=3, cycles=25, seed=7)


async def test_worker_sigkill_keeps_lineage(make_lane: LaneFactory) -> None:
    """The Faust worker is killed while a cycle's plans and commits are in flight; its table
    comes back from the changelog and the next cycle is incremental from the right change ID."""
    lane = await make_lane("w", 99)
    await lane.start(random_name("crash-worker"))
    await lane.cycle(1)
    await lane.cycle(2, kill="worker")
    await lane.cycle(3)
    assert _problems(lane) == []
    print(f"worker kill: delay {lane.kills[0].delay_s:.2f}s, {lane.kills[0].outcomes_before} "
          f"outcomes before; cycle 2 {lane.cycles[1].seconds:.1f}s")
