"""A real Faust worker (with the API) and a no-op copier per test module, on an isolated topic
prefix of the dev stack's broker, with an API token set."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from cbtctl.demo.processes import Proc
from cbtstream.config import Settings
from cbtstream.kafka import create_topics
from tests.support import isolated_settings

TOKEN = "s3cret-api-token-for-tests"


@dataclass
class ApiWorker:
    settings: Settings
    base: str
    procs: tuple[Proc, ...]

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {TOKEN}"}

    def check(self) -> None:
        for p in self.procs:
            if not p.alive:
                raise RuntimeError(f"{p.log.name} exited:\n{p.output()[-4000:]}")

    def logs(self) -> str:
        return "\n".join(f"--- {p.log.name}\n{p.output()[-5000:]}" for p in self.procs)


async def _wait_ready(w: ApiWorker, timeout: float = 60) -> None:
    """Until the worker's table is assigned (the disk route answers 404, not 503)."""
    url = f"{w.base}/api/v1/disks/00000000-0000-4000-8000-000000000000/disk-1"
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            w.check()
            try:
                async with http.get(url, headers=w.auth) as r:
                    if r.status == 404:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.3)
    raise TimeoutError(f"worker API not ready:\n{w.logs()}")


@pytest.fixture(scope="module")
def api_worker(stack_settings: Settings, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[ApiWorker]:
    tmp = tmp_path_factory.mktemp("api")
    settings = isolated_settings(stack_settings, tmp, api={"token": TOKEN},
                                 streams={"remove_snapshots": False})
    asyncio.run(create_topics(settings.kafka))
    logs = Path(tmp) / "logs"
    worker = Proc(["worker"], settings, logs / "worker.log")
    copier = Proc(["copier", "--noop"], settings, logs / "copier.log")
    w = ApiWorker(settings, f"http://127.0.0.1:{settings.streams.web_port}", (worker, copier))
    try:
        asyncio.run(_wait_ready(w))
        yield w
    finally:
        copier.stop()
        worker.stop()
