"""Per-ESXi-host copy limit (issue 20, item 4) end to end on the real stack.

Every VM of the simulator runs on its one standalone ESXi host. Three VMs of two disks each are
snapshotted at once; the copier may run six copies (``copier.max_parallel_disks``) but only two
of one host's VMs (``copier.max_copies_per_esxi_host``; no datastore limit, so the host's is
the one that binds). Never more than two copies run at once, two do, the others are reported
queued with the host's reason meanwhile, and every replica equals its snapshot byte for byte.

How concurrency is measured, so that it cannot hide an excess: a copy runs, at most, from the
copier's ``sync started`` log line (logged before the copy's source is opened, its time truncated
to the millisecond, so taken one millisecond later) to the ``occurred_at`` of its commit (made
when the copy ended, before its copy slot and host place free). Each span covers the copy's NFC
session, so the largest number of overlapping spans is at least the largest number of copies
that ran at once.
"""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from cbtctl.demo.scenario import Scenario, files_equal, random_name
from cbtctl.demo.workload import MiB, initial_fill
from cbtstream.config import Settings
from cbtstream.vsphere.simctl import SimulatorControl
from schemas.events import ChangeIdCommitted, SnapshotTaken, SyncProgress
from tests.e2e.conftest import Pipeline

pytestmark = pytest.mark.integration

#: The per-host limit under test, and the copier's slots (room for every disk at once).
HOST_LIMIT = 2
SLOTS = 6
#: The per-disk read rate: an 8 MiB disk takes about 2 s, so copies of the host overlap.
RATE = 4 * MiB


@pytest.fixture
def e2e_settings(e2e_settings: Settings) -> Settings:
    copier = e2e_settings.copier.model_copy(update={
        "max_bytes_per_s": RATE, "max_parallel_disks": SLOTS,
        "max_copies_per_esxi_host": HOST_LIMIT, "max_copies_per_datastore": 0,
        "queue_report_interval_s": 0.5})
    return e2e_settings.model_copy(update={"copier": copier})


def _starts(logs: Path) -> dict[str, datetime]:
    """``sync started`` time per sync id, from the copier's JSON log, plus the 1 ms its
    millisecond timestamp may have lost."""
    out: dict[str, datetime] = {}
    for log in sorted(logs.glob("copier-*.log")):
        for line in log.read_text(errors="replace").splitlines():
            if '"sync started"' not in line:
                continue
            rec = json.loads(line)
            out.setdefault(rec["sync_id"], datetime.fromisoformat(rec["ts"])
                           + timedelta(milliseconds=1))
    return out


def _most_at_once(spans: list[tuple[datetime, datetime]]) -> int:
    edges = sorted([(t0, 1) for t0, _ in spans] + [(t1, -1) for _, t1 in spans])
    at_once = most = 0
    for _, step in edges:  # at equal times an end sorts before a start
        at_once += step
        most = max(most, at_once)
    return most


async def test_copies_of_one_esxi_host_stay_within_its_limit(
        e2e_settings: Settings, sim: SimulatorControl, pipeline: Pipeline,
        tmp_path: Path) -> None:
    vms: list[Scenario] = []
    try:
        for i in range(3):
            sc = Scenario(e2e_settings, sim, tmp_path / f"vm-{i}", seed=100 + i, timeout_s=120)
            sc.check_alive.append(pipeline.check)
            vms.append(sc)
            await sc.create_vm(random_name("e2e-host-limit"), [8 * MiB, 8 * MiB])
            assert sc.vm is not None
            await sc.write([w for d in sc.vm.disks
                            for w in initial_fill(sc.rng, d.key, d.capacity, 1.0)])
        pipeline.start_copier()
        taken: list[list[SnapshotTaken]] = await asyncio.gather(*(sc.snapshot() for sc in vms))
        hosts = {e.esxi_host for evs in taken for e in evs}
        assert len(hosts) == 1 and None not in hosts, hosts  # one host runs every VM
        host = str(hosts.pop())
        for sc, evs in zip(vms, taken, strict=True):
            await sc.wait(evs[0].vm_snapshot, [e.disk.device_key for e in evs])

        starts = _starts(pipeline.logs)
        spans: list[tuple[datetime, datetime]] = []
        queued: dict[str, set[str | None]] = {}
        for sc, evs in zip(vms, taken, strict=True):
            w, snap = sc.watcher, evs[0].vm_snapshot
            assert w is not None and sc.vm is not None
            plans = w.plans(snap)
            assert all(p.esxi_host == host for p in plans.values())  # the planner passed it on
            for key, out in w.outcomes(snap).items():
                assert isinstance(out, ChangeIdCommitted), out
                spans.append((starts[str(plans[key].sync_id)], out.occurred_at))
            ids = {p.sync_id for p in plans.values()}
            for ev in w.events:
                if isinstance(ev, SyncProgress) and ev.sync_id in ids and ev.state == "queued":
                    queued.setdefault(str(ev.sync_id), set()).add(ev.wait_reason)
            for d in sc.vm.disks:
                assert await asyncio.to_thread(files_equal, sc.replica(d.key), sc.model(d.key))
        most = _most_at_once(spans)
        first, last = min(t0 for t0, _ in spans), max(t1 for _, t1 in spans)
        print(f"\nHOST LIMIT {HOST_LIMIT} (slots {SLOTS}): 6 disks of 3 VMs on {host}: at most "
              f"{most} copies at once, {len(queued)} plans reported queued, reasons "
              f"{sorted({r or '' for rs in queued.values() for r in rs})}, all copied in "
              f"{(last - first).total_seconds():.1f}s")
        assert len(spans) == 6
        assert most == HOST_LIMIT
        # the four that waited said why: the host, never a slot (six slots, one plan a disk)
        assert len(queued) == 6 - HOST_LIMIT
        assert {r for rs in queued.values() for r in rs} == {
            f"esxi host {host.lower()} at its limit of {HOST_LIMIT}"}
    finally:
        for sc in vms:
            await sc.close()
