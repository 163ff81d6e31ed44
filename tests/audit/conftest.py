"""Audit fixtures: a fresh PostgreSQL schema per test on the stack's database, the consumer run
in-process, and a TCP proxy to PostgreSQL that a test can cut and restore."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import pytest

from cbtstream.config import Settings
from cbtstream.kafka import Publisher
from consumers.audit.consumer import AuditConsumer
from consumers.audit.repository import AuditRepository, AuditUnavailable
from schemas.events import Event

pytestmark = pytest.mark.integration

TABLES = {
    "events": "event_id",
    "replication_jobs": "id",
    "vm_disks": "job_id, disk_id",
    "cbt_history": "event_id",
}


@pytest.fixture
async def audit_schema(stack_settings: Settings) -> AsyncIterator[str]:
    schema = f"audit_t{uuid.uuid4().hex[:10]}"
    probe = AuditRepository(stack_settings.postgres, schema=schema, timeout_s=3)
    try:
        await probe.start()
    except AuditUnavailable as exc:
        pytest.fail(f"PostgreSQL does not answer: {exc}; run `cbtstream stack up`")
    try:
        yield schema
    finally:
        await probe.reset_schema(replace=True)
        await probe.stop()


@pytest.fixture
async def repo(stack_settings: Settings, audit_schema: str) -> AsyncIterator[AuditRepository]:
    """A migrated repository on the test's own schema (direct connection)."""
    async with AuditRepository(stack_settings.postgres, schema=audit_schema) as r:
        await r.migrate()
        yield r


@pytest.fixture
def audit_settings(kafka_settings: Settings, audit_schema: str) -> Settings:
    pg = kafka_settings.postgres.model_copy(update={"db_schema": audit_schema})
    return kafka_settings.model_copy(update={"postgres": pg})


async def dump(repo: AuditRepository) -> dict[str, list[dict[str, Any]]]:
    """Every row of every audit table (minus ingestion times), in key order."""
    out = {}
    for table, key in TABLES.items():
        rows = await repo.fetch(f"SELECT * FROM {table} ORDER BY {key}")
        out[table] = [{k: v for k, v in r.items() if k != "ingested_at"} for r in rows]
    return out


async def publish(settings: Settings, events: Sequence[Event]) -> None:
    async with Publisher(settings.kafka, linger_ms=20) as pub:
        await asyncio.gather(*(pub.publish(e) for e in events))


async def wait_for(cond: Callable[[], Awaitable[bool]], timeout: float = 30,
                   what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not await cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not met within {timeout}s")
        await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def running_audit(settings: Settings, **kwargs: Any) -> AsyncIterator[AuditConsumer]:
    """The audit consumer as a task of this loop; stopped (cleanly) on exit."""
    repo = AuditRepository(settings.postgres)
    async with Publisher(settings.kafka) as pub:
        consumer = AuditConsumer(settings, repo, pub, **kwargs)
        task = asyncio.create_task(consumer.run())
        try:
            yield consumer
            assert not task.done() or task.exception() is None, task.exception()
        finally:
            consumer.request_stop()
            await asyncio.wait_for(task, 20)
            await repo.stop()


class PgProxy:
    """A TCP proxy 127.0.0.1:<port> -> PostgreSQL, to cut the link without touching the shared
    server: :meth:`close` refuses new connections and aborts open ones; :meth:`open` resumes on
    the same port."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._transports: set[asyncio.WriteTransport] = set()

    async def open(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port,
                                                  reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for t in list(self._transports):
            t.abort()
        self._transports.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._transports |= {writer.transport, up_w.transport}

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            w.transport.abort()

        await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))
        self._transports -= {writer.transport, up_w.transport}


# The real pipeline (Faust worker + copier + simulator) for the end-to-end audit test.
from tests.e2e.conftest import e2e_settings, pipeline, scenario, sim  # noqa: E402, F401
