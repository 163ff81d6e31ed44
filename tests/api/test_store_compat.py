"""The seed's job sheet, both directions, against a real worker and audit consumer.

An external copier (a migratekit fork) reads each disk's previous change ID with the seed's GET
and stores the new one with the seed's POST after every sync. The test replays the job sheet's
Task 3.1 curl commands, then two disks of one VM (and a single-disk VM) over three cycles of
store calls, including the seed's two failure modes (a missing disk_id that the seed defaulted to
disk-2000, an unknown disk_id the seed wrote to the first disk), a stale previous_change_id, a
re-posted call and a CBT reset; then the seed's two SQL queries on the audit trail show each
disk's own change IDs. Every request and response is printed (``-s`` shows them).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from cbtctl.demo.processes import Proc
from cbtctl.demo.seed import SEED_QUERY_1, SEED_QUERY_2
from cbtstream.config import Settings
from cbtstream.kafka import Publisher, create_topics
from consumers.audit.repository import AuditRepository
from schemas.topics import CHANGEID_COMMITTED
from tests.api.conftest import TOKEN, ApiWorker, _wait_ready
from tests.api.test_http import change_id, snapshots
from tests.replay.test_replay_pipeline import run_cli
from tests.support import isolated_settings, read_topic

pytestmark = pytest.mark.integration

SINGLE = ("51aaaaaa-0000-4000-8000-000000000001", "/DatabanxDC/vm/QCDev-Jump05", (2000,))
MULTI = ("51bbbbbb-0000-4000-8000-000000000002", "/DatabanxDC/vm/pgtest1", (2000, 2001))


@pytest.fixture(scope="module")
def seed_worker(stack_settings: Settings, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[ApiWorker]:
    """A worker whose two VMs are copied by an external copier, and the audit consumer."""
    tmp = tmp_path_factory.mktemp("seed")
    schema = f"audit_t{uuid.uuid4().hex[:10]}"
    settings = isolated_settings(
        stack_settings, tmp, api={"token": TOKEN},
        streams={"remove_snapshots": False, "external": (SINGLE[0], MULTI[0])})
    settings = settings.model_copy(update={
        "postgres": settings.postgres.model_copy(update={"db_schema": schema})})
    asyncio.run(create_topics(settings.kafka))
    logs = Path(tmp) / "logs"
    worker = Proc(["worker"], settings, logs / "worker.log")
    audit = Proc(["audit"], settings, logs / "audit.log")
    w = ApiWorker(settings, f"http://127.0.0.1:{settings.streams.web_port}", (worker, audit))
    try:
        asyncio.run(_wait_ready(w))
        yield w
    finally:
        audit.stop()
        worker.stop()

        async def drop() -> None:
            async with AuditRepository(settings.postgres, schema=schema) as repo:
                await repo.reset_schema(replace=True)

        asyncio.run(drop())


async def call(w: ApiWorker, method: str, path: str, body: dict[str, Any] | None = None,
               **params: str) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.request(
            method, w.base + path, params=params, headers=w.auth,
            data=None if body is None else json.dumps(body)) as r:
        answer = await r.json(content_type=None)
    query = "&".join(f"{k}={v}" for k, v in params.items())
    print(f"\n$ curl -X {method} '{path}{'?' + query if query else ''}'"
          + (f" -d '{json.dumps(body)}'" if body is not None else ""))
    print(f"HTTP {r.status} {json.dumps(answer, sort_keys=True)}")
    return r.status, answer


async def snapshot_cycle(w: ApiWorker, seq: int) -> None:
    """The external copier's orchestrator publishes its VM snapshots (rows appear; cbtstream
    records them but never plans these disks)."""
    async with Publisher(w.settings.kafka) as pub:
        for vm in (SINGLE, MULTI):
            for ev in snapshots(vm, seq):
                await pub.publish(ev)
    deadline = time.monotonic() + 60
    for uuid_, _, keys in (SINGLE, MULTI):
        for k in keys:
            while True:
                w.check()
                status, body = await call(w, "GET", f"/api/v1/disks/{uuid_}/disk-{k}")
                if status == 200:
                    assert body["running_sync"] is None  # never planned by cbtstream
                    break
                assert time.monotonic() < deadline, w.logs()
                await asyncio.sleep(0.3)


def store_path(job: str) -> str:
    return f"/api/v1/replications/{job}/changeid"


async def test_the_seed_job_sheet_both_directions(seed_worker: ApiWorker) -> None:
    w = seed_worker
    u1, p1, _ = SINGLE
    u2, p2, _ = MULTI
    await snapshot_cycle(w, 1)

    # Task 3.1: the seed's curl commands, before any change ID was stored
    assert (await call(w, "GET", "/api/v1/replications/changeid", vm_path=p1))[1][
        "message"] == "No previous successful migration found"
    for disk in ("disk-2000", "disk-2001"):
        status, body = await call(w, "GET", "/api/v1/replications/changeid", vm_path=p2,
                                  disk_id=disk)
        assert status == 200 and body["change_id"] == ""
    status, body = await call(w, "GET", "/api/v1/replications/changeid", vm_path=p2)
    assert status == 409 and body["disk_ids"] == ["disk-2000", "disk-2001"]

    # cycle 1: first (full) copies; the single-disk VM needs no disk_id
    status, body = await call(w, "POST", store_path("job-c1-jump05"),
                              {"change_id": change_id(u1, 2000, 1)}, vm_path=p1)
    assert status == 200 and body["message"] == "ChangeID stored successfully"
    for k in (2000, 2001):
        status, body = await call(w, "POST", store_path(f"job-c1-{k}"),
                                  {"change_id": change_id(u2, k, 1), "disk_id": f"disk-{k}",
                                   "previous_change_id": "", "vm_path": p2})
        assert status == 200 and body["disk_id"] == f"disk-{k}"
    # the seed's failure mode 1: no disk_id on a multi-disk VM (the seed stored it on disk-2000)
    status, body = await call(w, "POST", store_path("job-c1-nodisk"),
                              {"change_id": change_id(u2, 2001, 2)}, vm_path=p2)
    assert status == 409 and body["disk_ids"] == ["disk-2000", "disk-2001"]
    # failure mode 2: an unknown disk_id (the seed wrote it to the VM's first disk)
    status, body = await call(w, "POST", store_path("job-c1-unknown"),
                              {"change_id": change_id(u2, 2001, 2), "disk_id": "disk-2005",
                               "previous_change_id": change_id(u2, 2001, 1)}, vm_path=p2)
    assert status == 404

    # cycles 2 and 3: incrementals, each from the disk's own previous change ID
    await snapshot_cycle(w, 2)
    answers: dict[tuple[int, int], dict[str, Any]] = {}
    for seq in (2, 3):
        for k in (2000, 2001):
            status, body = await call(w, "GET", "/api/v1/replications/changeid", vm_path=p2,
                                      disk_id=f"disk-{k}")
            assert body["change_id"] == change_id(u2, k, seq - 1)  # its own, never the other's
            status, body = await call(w, "POST", store_path(f"job-c{seq}-{k}"), {
                "change_id": change_id(u2, k, seq), "disk_id": f"disk-{k}",
                "previous_change_id": body["change_id"]}, vm_path=p2)
            assert status == 200, body
            answers[(seq, k)] = body
        if seq == 2:
            # a stale previous_change_id (a copier that missed a cycle): 409, current ID shown
            status, body = await call(w, "POST", store_path("job-stale"), {
                "change_id": change_id(u2, 2000, 9), "disk_id": "disk-2000",
                "previous_change_id": change_id(u2, 2000, 1)}, vm_path=p2)
            assert status == 409 and body["current_change_id"] == change_id(u2, 2000, 2)
            # the same store call again: the same answer, and no second event
            status, again = await call(w, "POST", store_path("job-c2-2001"), {
                "change_id": change_id(u2, 2001, 2), "disk_id": "disk-2001",
                "previous_change_id": change_id(u2, 2001, 1)}, vm_path=p2)
            assert status == 200 and again == answers[(2, 2001)]
            await snapshot_cycle(w, 3)
    # a CBT reset on disk-2001: a new epoch is refused as an incremental, stored as a full copy
    reset = "de ad be ef 00 00 00 00-00 00 00 00 00 00 00 01/1"
    req = {"change_id": reset, "disk_id": "disk-2001",
           "previous_change_id": change_id(u2, 2001, 3)}
    assert (await call(w, "POST", store_path("job-reset"), req, vm_path=p2))[0] == 409
    status, body = await call(w, "POST", store_path("job-reset"),
                              {**req, "replication_type": "full"}, vm_path=p2)
    assert status == 200

    # the read side answers each disk's own latest change ID
    latest = {k: (await call(w, "GET", "/api/v1/replications/changeid", vm_path=p2,
                             disk_id=f"disk-{k}"))[1]["change_id"] for k in (2000, 2001)}
    assert latest == {2000: change_id(u2, 2000, 3), 2001: reset}

    # exactly one commit event per accepted store call (the re-post made none)
    commits = await read_topic(w.settings, CHANGEID_COMMITTED, until=lambda ev: len(ev) >= 8)
    await asyncio.sleep(1.0)
    commits = await read_topic(w.settings, CHANGEID_COMMITTED, until=lambda ev: len(ev) >= 8)
    assert len(commits) == 8 and {c.origin for c in commits} == {"external"}
    assert len({c.event_id for c in commits}) == 8

    # replay verifies the external copier's chains like cbtstream's, status names the owner
    status, lines, err = await run_cli(w.settings, "replay", "--vm", u2)
    assert status == 0, err
    links = [o for o in lines if o["type"] == "link"]
    assert len(links) == 7 and {lk["origin"] for lk in links} == {"external"}
    [summary] = [o for o in lines if o["type"] == "summary"]
    assert summary["intact"] and summary["breaks"] == 0, lines
    status, lines, err = await run_cli(w.settings, "status", "--vm", u2)
    assert {o["owner"] for o in lines if o["type"] == "status"} == {"external"}, lines

    # the seed's SQL queries on the audit trail
    async with AuditRepository(w.settings.postgres,
                               schema=w.settings.postgres.db_schema) as repo:
        deadline = time.monotonic() + 60
        q1 = SEED_QUERY_1.format(vm_path=p2)
        while True:
            rows = await repo.fetch(q1)
            if len(rows) >= 7:
                break
            assert time.monotonic() < deadline, (rows, w.logs())
            await asyncio.sleep(0.5)
        print("\n" + q1 + "\n".join(f"{r['job_id']} {r['disk_id']} {r['disk_change_id']}"
                                    for r in rows))
        per_disk: dict[str, list[str]] = {}
        for r in rows:
            per_disk.setdefault(r["disk_id"], []).append(r["disk_change_id"])
        assert sorted(per_disk["disk-2000"]) == sorted(change_id(u2, 2000, s) for s in (1, 2, 3))
        assert sorted(per_disk["disk-2001"]) == sorted(
            [change_id(u2, 2001, s) for s in (1, 2, 3)] + [reset])
        q2 = SEED_QUERY_2.format(vm_name="pgtest1")
        jobs = await repo.fetch(q2)
        print("\n" + q2 + "\n".join(f"{j['id']} {j['source_vm_name']} {j['replication_type']} "
                                    f"{j['status']}" for j in jobs))
        assert [j["status"] for j in jobs] == ["completed"] * 4
        assert jobs[0]["replication_type"] == "full"  # the CBT reset, stored as a full copy
        origin = await repo.fetch("SELECT DISTINCT origin, origin_job_id FROM replication_jobs "
                                  "WHERE source_vm_path = $1 ORDER BY origin_job_id", p2)
        assert {o["origin"] for o in origin} == {"external"}
        assert "job-reset" in {o["origin_job_id"] for o in origin}
