"""Writes always need a token, against real workers.

An accepted store call makes a disk the external copier's: cbtstream stops planning it. So a
worker with no ``api.token`` (allowed on a loopback bind, where its read endpoints stay open)
refuses every store call with 403, publishes nothing, and keeps planning the disk; a worker with
a token refuses a call without it (401: ``tests/api/test_http.py``)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from cbtctl.demo.processes import Proc
from cbtstream.config import Settings
from cbtstream.kafka import Publisher, create_topics
from schemas.topics import CHANGEID_COMMITTED, SYNC_PLANNED
from tests.api.conftest import ApiWorker
from tests.api.test_http import change_id, snapshots
from tests.support import isolated_settings, read_topic

pytestmark = pytest.mark.integration

VM = ("52aaaaaa-0000-4000-8000-000000000001", "/DatabanxDC/vm/open1", (2000,))
KEY = f"{VM[0]}/disk-2000"


@pytest.fixture(scope="module")
def open_worker(stack_settings: Settings, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[ApiWorker]:
    """A worker on 127.0.0.1 without an API token, and a no-op copier."""
    tmp = tmp_path_factory.mktemp("open")
    settings = isolated_settings(stack_settings, tmp, api={"token": None},
                                 streams={"remove_snapshots": False, "web_host": "127.0.0.1"})
    assert settings.api.token is None
    asyncio.run(create_topics(settings.kafka))
    logs = Path(tmp) / "logs"
    worker = Proc(["worker"], settings, logs / "worker.log")
    copier = Proc(["copier", "--noop"], settings, logs / "copier.log")
    w = ApiWorker(settings, f"http://127.0.0.1:{settings.streams.web_port}", (worker, copier))
    try:
        yield w
    finally:
        copier.stop()
        worker.stop()


async def request(w: ApiWorker, method: str, path: str, body: dict[str, Any] | None = None,
                  headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.request(
            method, w.base + path, headers=headers or {},
            data=None if body is None else json.dumps(body)) as r:
        return r.status, await r.json(content_type=None)


async def committed_at(w: ApiWorker, seq: int, timeout: float = 90) -> dict[str, Any]:
    """The disk's row once cbtstream's (no-op) copier committed snapshot ``seq``; read without
    a token (the read endpoints are open on a loopback bind)."""
    deadline = time.monotonic() + timeout
    while True:
        w.check()
        try:
            status, body = await request(w, "GET", f"/api/v1/disks/{KEY}")
        except aiohttp.ClientError:
            status, body = 0, {}
        if status == 200 and body["change_id"] == change_id(VM[0], 2000, seq) \
                and body["running_sync"] is None:
            return body
        assert time.monotonic() < deadline, f"{status} {body}\n{w.logs()}"
        await asyncio.sleep(0.3)


async def publish_snapshot(w: ApiWorker, seq: int) -> None:
    async with Publisher(w.settings.kafka) as pub:
        for ev in snapshots(VM, seq):
            await pub.publish(ev)


async def test_unauthenticated_write_refused_and_disk_still_planned(open_worker: ApiWorker
                                                                    ) -> None:
    w = open_worker
    await publish_snapshot(w, 1)
    await committed_at(w, 1)
    # a well-formed store call that a worker would accept: it continues the disk's lineage
    store = {"change_id": change_id(VM[0], 2000, 2), "disk_id": "disk-2000",
             "previous_change_id": change_id(VM[0], 2000, 1), "vm_path": VM[1]}
    commit = {"job_id": "job-intruder", "change_id": store["change_id"],
              "previous_change_id": store["previous_change_id"]}
    for path, body in (("/api/v1/replications/job-intruder/changeid", store),
                       (f"/api/v1/disks/{KEY}/commits", commit)):
        for headers in ({}, {"Authorization": "Bearer some-guessed-token-0000"}):
            status, answer = await request(w, "POST", path, body, headers)
            assert status == 403, (path, answer)
            assert answer["error"] == "Writes need an API token"
            assert "CBTSTREAM_API__TOKEN" in answer["details"]

    # still cbtstream's disk: the next snapshot is planned and committed by its copier
    await publish_snapshot(w, 3)
    row = await committed_at(w, 3)
    assert row["commits"] == 2
    plans = await read_topic(w.settings, SYNC_PLANNED, until=lambda evs: any(
        getattr(e, "vm_snapshot", None) == "snapshot-3" for e in evs), watch=w.procs)
    assert [e.vm_snapshot for e in plans if type(e).__name__ == "SyncPlanned"] == [
        "snapshot-1", "snapshot-3"]
    commits = await read_topic(w.settings, CHANGEID_COMMITTED, until=lambda evs: len(evs) >= 2,
                               watch=w.procs)
    assert [(c.change_id, c.origin) for c in commits] == [
        (change_id(VM[0], 2000, 1), "cbtstream"), (change_id(VM[0], 2000, 3), "cbtstream")]

