"""Load (issue 8, item 4): many disks x 3 cycles through the real worker and ``copier --noop``.

Checked, for every disk:

- after each cycle the table row (changelog) has one more commit and no running sync;
- the replay of the whole log (``cbtctl.replay``: the planner's and the guard's own functions
  over the log) finds no break, and every disk has exactly 3 applied commits: full from nothing,
  then incremental, each from the previous commit's change ID;
- after the load the worker is stopped and a new one started: the time from its start until
  its HTTP API (``GET /api/v1/disks/<key>``) answers every sampled disk with the cycle-3 change
  ID is the recovery time (printed, and bounded: see :func:`check_recovery`);
- one more cycle for a sample of disks is planned incremental from that disk's cycle-3 change
  ID, and commits.

``test_load_small`` (300 disks) runs in ``make test``; ``test_load_10k`` is ``soak``-marked.
Each run uses its own topic prefix and deletes its topics at the end.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from cbtctl.bench.pipeline import delete_topics
from cbtctl.demo.processes import Proc
from cbtctl.replay.reader import StartAt
from cbtctl.replay.run import load
from cbtstream.config import Settings
from cbtstream.kafka import create_topics
from schemas.codec import decode
from schemas.events import SyncPlanned
from schemas.topics import SYNC_PLANNED
from tests.load.loadgen import Changelog, Fleet, api_get, publish_cycle, wait_api
from tests.support import isolated_settings, read_topic

pytestmark = pytest.mark.integration

CYCLES = 3
#: Start-up of a worker process (imports, Faust, joining the group) on a slow machine.
STARTUP_ALLOWANCE_S = 60.0


def load_settings(base: Settings, tmp: Path, partitions: int) -> Settings:
    s = isolated_settings(base, tmp, kafka={"partitions": partitions},
                          streams={"remove_snapshots": False})
    return s.model_copy(update={"log_level": "WARNING"})


async def run_load(base: Settings, tmp: Path, disks: int, *, partitions: int = 4,
                   sample: int = 100, cycle_timeout: float = 120) -> dict[str, float]:
    settings = load_settings(base, tmp, partitions)
    fleet = Fleet(uuid.uuid4().hex, disks)
    keys = [fleet.key(i).encode() for i in range(disks)]
    figures: dict[str, float] = {}
    await create_topics(settings.kafka)
    worker = Proc(["worker"], settings, tmp / "worker-1.log")
    copier = Proc(["copier", "--noop"], settings, tmp / "copier.log")
    procs = [worker, copier]

    def alive() -> None:
        for p in procs:
            if not p.alive:
                raise RuntimeError(f"{p.log.name} exited:\n{p.output()[-3000:]}")

    changelog = Changelog(settings)
    await changelog.start()
    try:
        t_start = time.monotonic()
        for cycle in range(1, CYCLES + 1):
            t0 = time.monotonic()
            await publish_cycle(settings, fleet, cycle, range(disks))
            done = await changelog.wait(keys, cycle, cycle_timeout, alive)
            figures[f"cycle{cycle}_s"] = done - t0
            print(f"cycle {cycle}: {disks} disks in {done - t0:.1f}s "
                  f"({disks / (done - t0):.0f} disks/s)", flush=True)
        figures["load_s"] = time.monotonic() - t_start
        for i in range(disks):
            row = changelog.rows[keys[i]]
            assert row["change_id"] == fleet.change_id(i, CYCLES), row
            assert row["replication_type"] == "incremental" and row["commits"] == CYCLES, row

        # -- lineage of every disk, replayed from the log -------------------------------------
        t0 = time.monotonic()
        result = await load(settings, StartAt())
        figures["replay_s"] = time.monotonic() - t0
        assert not result.breaks, result.breaks[:5]
        for i in range(disks):
            lineage = result.disks[fleet.key(i)]
            links = [link.commit for link in lineage.links]
            assert [c.change_id for c in links] == [fleet.change_id(i, c)
                                                    for c in range(1, CYCLES + 1)]
            assert links[0].previous_change_id is None and links[0].replication_type == "full"
            for prev, cur in itertools.pairwise(links):
                assert cur.replication_type == "incremental", cur
                assert cur.previous_change_id == prev.change_id
        print(f"replay of {result.records} records: {figures['replay_s']:.1f}s, no break")

        # -- restart: the table comes back from its changelog ---------------------------------
        rng = random.Random(disks)
        picked = sorted(rng.sample(range(disks), min(sample, disks)))
        worker.stop()
        t0 = time.monotonic()
        worker = Proc(["worker"], settings, tmp / "worker-2.log")
        procs[0] = worker
        first, answered = await wait_api(
            settings.streams.web_port, {fleet.key(i): fleet.change_id(i, CYCLES) for i in picked},
            timeout=600, alive=alive)
        figures["api_up_s"] = first - t0
        figures["recovery_api_s"] = answered - t0
        print(f"restart: web server answers after {figures['api_up_s']:.1f}s, every one of "
              f"{len(picked)} sampled disks with its cycle-{CYCLES} change ID after "
              f"{figures['recovery_api_s']:.1f}s", flush=True)

        # -- one more cycle for the sample: incremental from the right change ID --------------
        nxt = CYCLES + 1
        await publish_cycle(settings, fleet, nxt, picked)
        await changelog.wait([keys[i] for i in picked], nxt, cycle_timeout, alive)
        want = {fleet.key(i): i for i in picked}

        def plans_seen(recs: list[Any]) -> bool:
            return len(_plans(recs, want, nxt)) == len(want)

        recs = await read_topic(settings, SYNC_PLANNED, raw=True, until=plans_seen,
                                timeout=120)
        for key, plan in _plans(recs, want, nxt).items():
            i = want[key]
            assert plan.replication_type == "incremental", plan
            assert plan.base_change_id == plan.previous_change_id == fleet.change_id(i, CYCLES)
            assert changelog.rows[key.encode()]["change_id"] == fleet.change_id(i, nxt)
            status, doc = await asyncio.to_thread(api_get, settings.streams.web_port,
                                                  f"/api/v1/disks/{key}")
            assert status == 200 and doc is not None, status
            assert doc["change_id"] == fleet.change_id(i, nxt) and doc["commits"] == nxt
        return figures
    except BaseException:
        for p in procs:
            print(f"--- {p.log.name}\n{p.output()[-4000:]}")
        raise
    finally:
        await changelog.stop()
        copier.stop()
        worker.stop()
        await delete_topics(settings)


def _plans(recs: list[Any], want: dict[str, int], cycle: int) -> dict[str, SyncPlanned]:
    out = {}
    snapshot = f"snapshot-{cycle}"
    for r in recs:
        if r.key is None or r.key.decode() not in want:
            continue
        ev = decode(r.value, key=r.key)
        if isinstance(ev, SyncPlanned) and ev.vm_snapshot == snapshot:
            out[ev.disk.key] = ev
    return out


def check_recovery(figures: dict[str, float]) -> None:
    """The restarted worker restores its table from the changelog (a few rows per disk): it
    answers for every sampled disk no later than the three cycles took to build that table
    through the pipeline, or than a worker's start-up allowance, whichever is longer (3 s for
    300 disks on the dev stack, against a bound of a minute). Both sides grow with the
    machine's slowness, so a correct run always meets it; a restart that stalls for minutes
    (waiting out timeouts, rebalancing over and over) fails it, where ``wait_api`` alone would
    wait 600 s and pass. Each cycle is bounded by ``cycle_timeout`` already."""
    bound = max(STARTUP_ALLOWANCE_S, figures["load_s"])
    assert figures["recovery_api_s"] < bound, (figures, bound)


async def test_load_small(stack_settings: Settings, tmp_path: Path) -> None:
    figures = await run_load(stack_settings, tmp_path, 300, sample=50, cycle_timeout=60)
    print("figures:", {k: round(v, 2) for k, v in figures.items()})
    check_recovery(figures)


@pytest.mark.soak
@pytest.mark.timeout(3600)
async def test_load_10k(stack_settings: Settings, tmp_path: Path) -> None:
    figures = await run_load(stack_settings, tmp_path, 10_000, sample=200, cycle_timeout=600)
    print("figures:", {k: round(v, 2) for k, v in figures.items()})
    check_recovery(figures)
