"""The whole API with two planner workers (issue 21, items 2 and 3): the table is spread over
them (two partitions, one each) and a VM's disks live on both, yet every worker answers the
seed's VM-wide calls, the store call, the orphan needs and the status for the whole table (each
asks the other for its part, ``streams.gather``).

A 3-disk VM (``pgtest3``) whose disks fall on both partitions goes through one cycle with the
no-op copier; another (``ext2``) takes a store call on the worker that does *not* hold the
disk; a third (``idle3``) is in a pool with no copier, so its syncs stay running and its
snapshot is needed."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from cbtctl.demo.processes import Proc, child_env
from cbtstream.config import Settings
from cbtstream.kafka import Publisher, create_topics, key_partition
from tests.api.conftest import TOKEN, ApiWorker
from tests.api.test_http import change_id, snapshots
from tests.support import free_port, isolated_settings

pytestmark = pytest.mark.integration

Vm = tuple[str, str, tuple[int, ...]]


def spread_vm(prefix: str, path: str, keys: tuple[int, ...], partitions: int = 2) -> Vm:
    """A VM whose disks fall on every partition (so on both workers)."""
    for n in range(1, 1000):
        uuid = f"{prefix}-0000-4000-8000-{n:012x}"
        if len({key_partition(f"{uuid}/disk-{k}".encode(), partitions) for k in keys}) \
                == partitions:
            return uuid, path, keys
    raise AssertionError("no spread VM")


VM3 = spread_vm("51aaaaaa", "/DatabanxDC/vm/pgtest3", (2000, 2001, 2002))
EXT = spread_vm("51bbbbbb", "/DatabanxDC/vm/ext2", (2000, 2001))
IDLE = spread_vm("51cccccc", "/DatabanxDC/vm/idle3", (2000, 2001, 2002))


async def call(base: str, method: str, path: str, body: Any = None, **params: str
               ) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http, http.request(
            method, base + path, params=params, json=body,
            headers={"Authorization": f"Bearer {TOKEN}"}) as r:
        return r.status, await r.json(content_type=None)


@pytest.fixture(scope="module")
def two(stack_settings: Settings, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[tuple[ApiWorker, ApiWorker]]:
    tmp = tmp_path_factory.mktemp("two")
    base = isolated_settings(
        stack_settings, tmp, api={"token": TOKEN},
        streams={"remove_snapshots": False, "sync_check_interval_s": 1.0},
        pools={"assign": [{"vm": IDLE[0], "pool": "idle"}]})
    asyncio.run(create_topics(base.kafka))
    logs = Path(tmp) / "logs"
    procs, workers = [], []
    try:
        for i in range(2):
            data = base.model_dump()
            data["streams"] |= {"web_port": free_port(), "data_dir": tmp / f"faust-{i}"}
            s = Settings.model_validate(data)
            procs.append(Proc(["worker"], s, logs / f"worker-{i}.log"))
            workers.append(s)
        procs.append(Proc(["copier", "--noop"], base, logs / "copier.log"))
        pair = tuple(ApiWorker(s, f"http://127.0.0.1:{s.streams.web_port}", tuple(procs))
                     for s in workers)
        asyncio.run(_spread(pair[0]))
        yield pair[0], pair[1]
    finally:
        for p in reversed(procs):
            p.stop()


async def _spread(w: ApiWorker, timeout: float = 90) -> None:
    """Until the status is gathered from two workers, one partition each."""
    deadline = time.monotonic() + timeout
    while True:
        w.check()
        try:
            status, body = await call(w.base, "GET", "/api/v1/status", disks="0")
        except aiohttp.ClientError:
            status, body = 0, None
        if status == 200 and len(body["workers"]) == 2:
            return
        assert time.monotonic() < deadline, f"{status} {body}\n{w.logs()}"
        await asyncio.sleep(0.5)


async def _until(w: ApiWorker, what: str, check: Any, timeout: float = 90) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        w.check()
        got = await check()
        if got:
            return got
        assert time.monotonic() < deadline, f"{what}\n{w.logs()}"
        await asyncio.sleep(0.3)


@pytest.fixture(scope="module")
def cycled(two: tuple[ApiWorker, ApiWorker]) -> tuple[ApiWorker, ApiWorker]:
    """Every VM through snapshot 3: VM3 and EXT committed by the no-op copier, IDLE planned
    into a pool with no copier (its syncs keep running)."""
    a, _ = two

    async def run() -> None:
        async with Publisher(a.settings.kafka) as pub:
            for vm in (VM3, EXT, IDLE):
                for ev in snapshots(vm, 3):
                    await pub.publish(ev)
        for uuid, _, keys in (VM3, EXT):
            for k in keys:
                async def done(uuid: str = uuid, k: int = k) -> bool:
                    status, body = await call(a.base, "GET", f"/api/v1/disks/{uuid}/disk-{k}")
                    return status == 200 and body["change_id"] == change_id(uuid, k, 3) \
                        and body["running_sync"] is None
                await _until(a, f"{uuid}/disk-{k} committed", done)

    asyncio.run(run())
    return two


async def test_the_table_is_spread_over_both_workers(cycled: tuple[ApiWorker, ApiWorker]
                                                     ) -> None:
    for w in cycled:
        status, body = await call(w.base, "GET", "/api/v1/status", disks="0")
        assert status == 200
        assert sorted(p for x in body["workers"] for p in x["partitions"]) == [0, 1]
        assert all(len(x["partitions"]) == 1 for x in body["workers"])


async def test_seed_calls_for_a_three_disk_vm_on_either_worker(
        cycled: tuple[ApiWorker, ApiWorker]) -> None:
    uuid, path, keys = VM3
    for w in cycled:
        status, body = await call(w.base, "GET", "/api/v1/replications/changeid", vm_path=path)
        assert status == 409, body
        assert body["disk_ids"] == ["disk-2000", "disk-2001", "disk-2002"]
        for k in keys:
            status, body = await call(w.base, "GET", "/api/v1/replications/changeid",
                                      vm_path=path, disk_id=f"disk-{k}")
            assert (status, body) == (200, {
                "vm_path": path, "disk_id": f"disk-{k}", "change_id": change_id(uuid, k, 3),
                "message": "Previous change ID found"})
            status, body = await call(w.base, "GET", f"/api/v1/disks/{uuid}/disk-{k}")
            assert (status, body["change_id"]) == (200, change_id(uuid, k, 3))
        status, body = await call(w.base, "GET", f"/api/v1/vms/{uuid}/disks")
        assert status == 200
        assert [d["change_id"] for d in body["disks"]] == [change_id(uuid, k, 3) for k in keys]


async def test_store_call_on_the_worker_that_does_not_hold_the_disk(
        cycled: tuple[ApiWorker, ApiWorker]) -> None:
    uuid, path, _ = EXT
    a, b = cycled
    key = f"{uuid}/disk-2001"
    status, body = await call(a.base, "GET", "/api/v1/status", disk=key)
    holder = next(x["url"] for x in body["workers"]
                  if key_partition(key.encode(), 2) in x["partitions"])
    other = b if holder == a.base else a
    assert other.base != holder
    store = {"change_id": change_id(uuid, 2001, 4), "disk_id": "disk-2001",
             "previous_change_id": change_id(uuid, 2001, 3), "vm_path": path}
    status, body = await call(other.base, "POST", "/api/v1/replications/job-two/changeid",
                              store)
    assert (status, body["message"], body["disk_key"]) == (
        200, "ChangeID stored successfully", key)
    for w in cycled:  # applied by the holder, seen from both
        status, row = await call(w.base, "GET", f"/api/v1/disks/{uuid}/disk-2001")
        assert (row["change_id"], row["commits"]) == (change_id(uuid, 2001, 4), 2)
    # the same call again: recognised as applied, same answer
    assert (await call(other.base, "POST", "/api/v1/replications/job-two/changeid",
                       store))[0] == 200
    # without disk_id: the VM has two disks, on two workers: 409 with both
    status, body = await call(other.base, "POST", "/api/v1/replications/job-two/changeid",
                              {k: v for k, v in store.items() if k != "disk_id"})
    assert (status, body["disk_ids"]) == (409, ["disk-2000", "disk-2001"])


async def test_orphan_needs_are_gathered_from_both_workers(
        cycled: tuple[ApiWorker, ApiWorker]) -> None:
    """The idle VM's snapshot is needed (its three syncs run, on both workers' partitions);
    the committed VMs' snapshots are not; every worker answers the same, whole."""
    for w in cycled:
        async def needed(w: ApiWorker = w) -> Any:
            status, body = await call(w.base, "GET", "/api/v1/snapshots/needed")
            return body if status == 200 and body["complete"] else None
        body = await _until(w, "needs complete", needed)
        assert body["needed"] == [{"vm_instance_uuid": IDLE[0], "vm_snapshot": "snapshot-3"}]


async def test_status_from_the_table_of_both_workers(cycled: tuple[ApiWorker, ApiWorker]
                                                     ) -> None:
    a, b = cycled

    async def waiting() -> Any:
        status, body = await call(b.base, "GET", "/api/v1/status")
        ok = status == 200 and body["summary"]["copies"]["waiting_for_pool"] == 3
        return body if ok else None

    body = await _until(b, "idle pool seen without copier", waiting)
    s = body["summary"]
    assert s["disks"] == 8
    assert s["states"] == {"queued": 0, "running": 0, "silent": 0, "planned": 0,
                           "waiting_for_pool": 3, "failed": 0, "synced": 5, "new": 0}
    assert s["rpo"]["none"] == 3 and s["rpo"]["met"] + s["rpo"]["missed"] == 5
    assert s["pools"]["idle"]["copies"]["waiting_for_pool"] == 3
    assert s["pools"]["idle"]["live_copiers"] == 0
    assert s["oldest_commit"]["disk"].split("/")[0] in (VM3[0], EXT[0])
    assert {d["disk"] for d in body["disks"]} == {
        f"{u}/disk-{k}" for u, _, keys in (VM3, EXT, IDLE) for k in keys}
    # the CLI asks a worker (here the first) and prints JSON lines for scripts
    out = subprocess.run([sys.executable, "-m", "cbtctl.cli", "status", "--json", "--vm",
                          VM3[1]], env=child_env(a.settings), capture_output=True, text=True,
                         timeout=60, check=True)
    lines = [json.loads(x) for x in out.stdout.splitlines()]
    disks = [x for x in lines if x.get("type") == "status"]
    [site] = [x for x in lines if x.get("type") == "site"]
    assert [d["disk"] for d in disks] == [f"{VM3[0]}/disk-{k}" for k in VM3[2]]
    assert all(d["state"] == "synced" and d["rpo"] in ("met", "missed") for d in disks)
    assert (site["disks"], site["source"], len(site["workers"])) == (3, "table", 2)
    assert "replaying the log" not in out.stderr
