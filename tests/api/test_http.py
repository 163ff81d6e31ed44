"""The seed-compatible API over HTTP, against a real worker whose table was filled by the real
pipeline (SnapshotTaken -> plan -> no-op copier -> ChangeIdCommitted -> table).

Includes the seed's curl cases: a single-disk VM without disk_id, a multi-disk VM per disk, and a
multi-disk VM without disk_id (409: never a guess)."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest

from cbtstream.kafka import Publisher
from schemas import DiskRef, SnapshotTaken
from tests.api.conftest import ApiWorker

pytestmark = pytest.mark.integration

SINGLE = ("50aaaaaa-0000-4000-8000-000000000001", "/DatabanxDC/vm/QCDev-Jump05", (2000,))
MULTI = ("50bbbbbb-0000-4000-8000-000000000002", "/DatabanxDC/vm/pgtest1", (2000, 2001))
# Two VMs at one path (a VM deleted and re-created under the same name).
DUP1 = ("50cccccc-0000-4000-8000-000000000003", "/DatabanxDC/vm/dup", (2000,))
DUP2 = ("50dddddd-0000-4000-8000-000000000004", "/DatabanxDC/vm/dup", (2000,))


def epoch(vm: str, key: int) -> str:
    """A distinct CBT epoch per disk, so a wrong disk's change ID is recognisable."""
    h = f"{vm[2:8]}{key:04x}{'0' * 22}"[:32]
    return " ".join(h[i:i + 2] for i in range(0, 16, 2)) + "-" + " ".join(
        h[i:i + 2] for i in range(16, 32, 2))


def change_id(vm: str, key: int, seq: int) -> str:
    return f"{epoch(vm, key)}/{seq}"


def snapshots(vm: tuple[str, str, tuple[int, ...]], seq: int) -> list[SnapshotTaken]:
    uuid, path, keys = vm
    return [SnapshotTaken(
        disk=DiskRef(vm_instance_uuid=uuid, vm_path=path, vm_name=path.rsplit("/", 1)[-1],
                     device_key=k, backing_uuid=f"6000C29-{uuid[:8]}-{k}",
                     backing_file=f"[ds1] {uuid[:8]}/disk_{k}.vmdk", capacity_bytes=1 << 30),
        vcenter="vcsim", vm_snapshot=f"snapshot-{seq}", change_id=change_id(uuid, k, seq),
        taken_at=datetime(2026, 1, 1, 12, seq, tzinfo=UTC)) for k in keys]


async def get(w: ApiWorker, path: str, headers: dict[str, str] | None = None,
              **params: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http, http.get(
        w.base + path, params=params, headers=w.auth if headers is None else headers
    ) as r:
        return r.status, await r.json(content_type=None)


@pytest.fixture(scope="module")
def committed(api_worker: ApiWorker) -> ApiWorker:
    """Every VM above through one cycle (seq 3), then pgtest1 through a second (seq 7)."""

    async def cycle(vms: list[tuple[str, str, tuple[int, ...]]], seq: int) -> None:
        async with Publisher(api_worker.settings.kafka) as pub:
            for vm in vms:
                for ev in snapshots(vm, seq):
                    await pub.publish(ev)
        deadline = time.monotonic() + 60
        for uuid, _, keys in vms:
            for k in keys:
                while True:
                    api_worker.check()
                    status, body = await get(api_worker, f"/api/v1/disks/{uuid}/disk-{k}")
                    if status == 200 and body["change_id"] == change_id(uuid, k, seq) \
                            and body["running_sync"] is None:
                        break
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{uuid}/disk-{k}: {status} {body}\n"
                                           f"{api_worker.logs()}")
                    await asyncio.sleep(0.2)

    asyncio.run(cycle([SINGLE, MULTI, DUP1, DUP2], 3))
    asyncio.run(cycle([MULTI], 7))
    return api_worker


# -- the seed's curl cases -------------------------------------------------------------------
async def test_single_disk_vm_without_disk_id(committed: ApiWorker) -> None:
    uuid, path, _ = SINGLE
    status, body = await get(committed, "/api/v1/replications/changeid", vm_path=path)
    assert (status, body) == (200, {
        "vm_path": path, "disk_id": "disk-2000", "change_id": change_id(uuid, 2000, 3),
        "message": "Previous change ID found"})


async def test_multi_disk_vm_each_disk_gets_its_own_change_id(committed: ApiWorker) -> None:
    uuid, path, _ = MULTI
    for k in (2000, 2001):
        status, body = await get(committed, "/api/v1/replications/changeid",
                                 vm_path=path, disk_id=f"disk-{k}")
        assert (status, body) == (200, {
            "vm_path": path, "disk_id": f"disk-{k}", "change_id": change_id(uuid, k, 7),
            "message": "Previous change ID found"})


async def test_multi_disk_vm_without_disk_id_is_409_never_a_guess(committed: ApiWorker) -> None:
    status, body = await get(committed, "/api/v1/replications/changeid", vm_path=MULTI[1])
    assert status == 409
    assert body["disk_ids"] == ["disk-2000", "disk-2001"]
    assert "change_id" not in body


# -- the rest --------------------------------------------------------------------------------
async def test_unknown_vm_and_unknown_disk_answer_like_the_seed(committed: ApiWorker) -> None:
    status, body = await get(committed, "/api/v1/replications/changeid",
                             vm_path="/DatabanxDC/vm/nosuchvm")
    assert (status, body) == (200, {"vm_path": "/DatabanxDC/vm/nosuchvm", "disk_id": "",
                                    "change_id": "",
                                    "message": "No previous successful migration found"})
    status, body = await get(committed, "/api/v1/replications/changeid",
                             vm_path=MULTI[1], disk_id="disk-2002")
    assert (status, body["change_id"], body["disk_id"]) == (200, "", "disk-2002")
    assert body["message"] == "No previous successful migration found"


async def test_missing_vm_path_is_400(committed: ApiWorker) -> None:
    status, body = await get(committed, "/api/v1/replications/changeid", disk_id="disk-2000")
    assert status == 400
    assert body["error"] == "Missing vm_path parameter"


async def test_path_shared_by_two_vms_is_409(committed: ApiWorker) -> None:
    status, body = await get(committed, "/api/v1/replications/changeid",
                             vm_path="/DatabanxDC/vm/dup", disk_id="disk-2000")
    assert status == 409
    assert body["vm_instance_uuids"] == sorted([DUP1[0], DUP2[0]])


async def test_disk_endpoint(committed: ApiWorker) -> None:
    uuid = MULTI[0]
    status, body = await get(committed, f"/api/v1/disks/{uuid}/disk-2001")
    assert status == 200
    assert body["disk_key"] == f"{uuid}/disk-2001"
    assert body["change_id"] == change_id(uuid, 2001, 7)
    assert body["replication_type"] == "incremental"
    assert body["commits"] == 2
    assert body["committed_at"] and body["last_failure"] is None
    assert body["running_sync"] is None and body["waiting_snapshot"] is None
    status, body = await get(committed, f"/api/v1/disks/{uuid}/disk-2009")
    assert status == 404
    status, body = await get(committed, "/api/v1/disks/not-a-uuid/disk-1")
    assert status == 404


async def test_vm_disks_endpoint(committed: ApiWorker) -> None:
    uuid = MULTI[0]
    status, body = await get(committed, f"/api/v1/vms/{uuid}/disks")
    assert status == 200
    assert [d["disk"]["disk_id"] for d in body["disks"]] == ["disk-2000", "disk-2001"]
    assert [d["change_id"] for d in body["disks"]] == [
        change_id(uuid, 2000, 7), change_id(uuid, 2001, 7)]
    status, _ = await get(committed, "/api/v1/vms/50eeeeee-0000-4000-8000-000000000009/disks")
    assert status == 404


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"},
                                     {"Authorization": "Basic czNjcmV0"}])
async def test_token_required(api_worker: ApiWorker, headers: dict[str, str]) -> None:
    for path in ("/api/v1/replications/changeid?vm_path=/x",
                 f"/api/v1/disks/{MULTI[0]}/disk-2000", f"/api/v1/vms/{MULTI[0]}/disks"):
        status, body = await get(api_worker, path, headers=headers)
        assert status == 401, path
        assert body["error"] == "Unauthorized"


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-token-0000000000"}])
async def test_write_without_the_token_refused(committed: ApiWorker,
                                               headers: dict[str, str]) -> None:
    """Store calls need the token too (401), and nothing is stored: a call that would be
    accepted with it (it continues the disk's lineage) leaves the disk as it was."""
    uuid, path, _ = SINGLE
    before = await get(committed, f"/api/v1/disks/{uuid}/disk-2000")
    body = {"change_id": change_id(uuid, 2000, 4), "previous_change_id": change_id(uuid, 2000, 3)}
    for url, data in ((f"/api/v1/replications/job-x/changeid?vm_path={path}", body),
                      (f"/api/v1/disks/{uuid}/disk-2000/commits", body | {"job_id": "job-x"})):
        async with aiohttp.ClientSession() as http, http.post(
                committed.base + url, json=data, headers=headers) as r:
            assert r.status == 401, url
            assert (await r.json())["error"] == "Unauthorized"
            assert r.headers["WWW-Authenticate"] == "Bearer"
    assert await get(committed, f"/api/v1/disks/{uuid}/disk-2000") == before


async def test_token_never_logged(committed: ApiWorker) -> None:
    from tests.api.conftest import TOKEN

    assert all(TOKEN not in p.output() for p in committed.procs)
