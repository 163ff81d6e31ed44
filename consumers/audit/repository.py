"""The audit database adapter: the only module that imports asyncpg.

It applies batches of events (the SQL comes from :mod:`consumers.audit.projection`), runs the
schema migrations, answers the read queries other components use, and rebuilds the tables from a
list of events (``cbtstream replay --rebuild-audit``) with the very same code as the live consumer.

All tables live in one PostgreSQL schema (``settings.db_schema``, or ``schema=``), put first on the
connection's ``search_path``. asyncpg and socket errors become :class:`AuditUnavailable`
(retriable: the connection is dropped and re-opened on the next call) or :class:`AuditError`.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from itertools import islice
from types import TracebackType
from typing import Any, NamedTuple

import asyncpg

from cbtstream.config import PostgresSettings
from cbtstream.errors import CbtStreamError, TransientError
from consumers.audit.migrations import Migration, load_migrations
from consumers.audit.projection import (
    INSERT_EVENTS,
    PHASES,
    AuditedEvent,
    event_row,
    newest_progress_only,
    project,
    stored_in_events,
)


class AuditUnavailable(TransientError):
    """PostgreSQL cannot be reached (down, restarting, network); retry later."""

    reason = "audit_db_unavailable"


class AuditError(CbtStreamError):
    """PostgreSQL refused a statement (bad data, schema drift, permissions): retrying won't help."""

    reason = "audit_db_error"


class AuditRecord(NamedTuple):
    """An event and where it was read from."""

    topic: str
    partition: int
    offset: int
    event: AuditedEvent


@dataclass(frozen=True)
class DiskChangeId:
    """A disk's latest committed (not refused) change ID, as ``vm_disks`` has it."""

    disk_key: str
    disk_id: str
    job_id: uuid.UUID
    change_id: str
    replication_type: str
    committed_at: datetime


@dataclass(frozen=True)
class HistoryEntry:
    """One row of ``cbt_history``: a commit of a disk, in log order."""

    event_id: uuid.UUID
    sync_id: uuid.UUID
    previous_change_id: str | None
    change_id: str
    replication_type: str
    reason: str
    bytes_copied: int
    digest: str
    committed_at: datetime
    refused: bool


@dataclass(frozen=True)
class MigrationState:
    version: int
    name: str
    applied_at: datetime | None
    checksum_matches: bool | None


#: Errors that mean "the server or the link is gone", not "the statement is wrong".
_UNAVAILABLE = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.OperatorInterventionError,
    asyncpg.InsufficientResourcesError,
    asyncpg.TransactionRollbackError,
)


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class AuditRepository:
    """One connection to the audit database. ``async with AuditRepository(settings) as repo``.

    Methods connect lazily, so a repository can be created while PostgreSQL is down; ``stop()``
    may be called twice.
    """

    def __init__(self, settings: PostgresSettings, *, schema: str | None = None,
                 timeout_s: float = 10.0, command_timeout_s: float = 60.0) -> None:
        self.settings = settings
        self.schema = schema or settings.db_schema
        self._timeout = timeout_s
        self._command_timeout = command_timeout_s
        self._conn: asyncpg.Connection | None = None

    async def start(self) -> None:
        await self._connection()

    async def stop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            try:
                await conn.close(timeout=5)
            except (*_UNAVAILABLE, asyncpg.PostgresError):
                conn.terminate()

    async def __aenter__(self) -> AuditRepository:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is not None and not self._conn.is_closed():
            return self._conn
        self._conn = None
        async with self._translated("connect"):
            self._conn = await asyncpg.connect(
                **self.settings.connect_kwargs(),
                timeout=self._timeout,
                command_timeout=self._command_timeout,
                server_settings={"search_path": quote_ident(self.schema),
                                 "application_name": "cbtstream-audit"},
            )
        return self._conn

    @contextlib.asynccontextmanager
    async def _translated(self, what: str) -> AsyncIterator[None]:
        try:
            yield
        except _UNAVAILABLE as exc:
            if self._conn is not None:
                self._conn.terminate()
                self._conn = None
            where = f"{self.settings.host}:{self.settings.port}/{self.settings.database}"
            raise AuditUnavailable(f"audit database {where} unavailable ({what}): "
                                   f"{type(exc).__name__}: {exc}") from exc
        except asyncpg.PostgresError as exc:
            raise AuditError(f"audit database refused {what}: {type(exc).__name__}: {exc}"
                             ) from exc

    # -- writing ------------------------------------------------------------------------------
    async def apply(self, records: Sequence[AuditRecord]) -> int:
        """Store a batch in one transaction; returns how many events were new.

        Order: insert the events rows (``on conflict (event_id) do nothing``), apply the
        projections of the events inserted now (grouped by statement, in
        :data:`~consumers.audit.projection.PHASES` order, one pipelined ``executemany`` each),
        commit. The caller commits its Kafka offsets only
        after this returned, so a crash anywhere before redelivers events that are then dropped
        as duplicates, or applied for the first time.
        """
        if not records:
            return 0
        conn = await self._connection()
        async with self._translated("apply"), conn.transaction():
            rows = [event_row(r.topic, r.partition, r.offset, r.event)
                    for r in records if stored_in_events(r.event)]
            inserted: set[uuid.UUID] = set()
            if rows:
                columns = [list(col) for col in zip(*rows, strict=True)]
                inserted = {r["event_id"] for r in await conn.fetch(INSERT_EVENTS, *columns)}
            fresh = set(inserted)
            phases: dict[str, dict[tuple[Any, ...], None]] = {sql: {} for sql in PHASES}
            for ev in newest_progress_only([r.event for r in records]):
                if stored_in_events(ev):
                    if ev.event_id not in fresh:
                        continue  # a duplicate: applied when first stored
                    fresh.discard(ev.event_id)
                for stmt in project(ev):
                    phases[stmt.sql][stmt.args] = None  # ordered set: drops repeats
            for sql, args in phases.items():
                if args:
                    await conn.executemany(sql, list(args))
        return len(inserted)

    # -- migrations ---------------------------------------------------------------------------
    async def migrate(self, migrations: Sequence[Migration] | None = None) -> list[Migration]:
        """Apply the pending migrations in one transaction; returns those applied now.

        Concurrent callers serialise on a transaction-scoped advisory lock named after the
        schema, so two processes starting at once apply each migration exactly once.
        """
        todo = list(migrations) if migrations is not None else load_migrations()
        conn = await self._connection()
        applied_now: list[Migration] = []
        async with self._translated("migrate"), conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))",
                               f"cbtstream.audit.migrate:{self.schema}")
            await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(self.schema)}")
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY, "
                "name text NOT NULL, checksum text NOT NULL, "
                "applied_at timestamptz NOT NULL DEFAULT now())")
            done = {r["version"]: r["checksum"]
                    for r in await conn.fetch("SELECT version, checksum FROM schema_migrations")}
            for m in todo:
                if m.version in done:
                    if done[m.version] != m.checksum:
                        raise AuditError(f"migration {m.version:04d}_{m.name} was changed after "
                                         "it was applied; add a new migration instead")
                    continue
                await conn.execute(m.sql)
                await conn.execute("INSERT INTO schema_migrations (version, name, checksum) "
                                   "VALUES ($1, $2, $3)", m.version, m.name, m.checksum)
                applied_now.append(m)
        return applied_now

    async def migration_status(self) -> list[MigrationState]:
        """Every known migration, applied or not, and whether its file still matches."""
        conn = await self._connection()
        async with self._translated("status"):
            exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
            rows = await conn.fetch("SELECT version, name, checksum, applied_at "
                                    "FROM schema_migrations") if exists else []
        applied = {r["version"]: r for r in rows}
        out = []
        for m in load_migrations():
            r = applied.pop(m.version, None)
            out.append(MigrationState(m.version, m.name, r["applied_at"] if r else None,
                                      (r["checksum"] == m.checksum) if r else None))
        out += [MigrationState(v, r["name"], r["applied_at"], None) for v, r in applied.items()]
        return sorted(out, key=lambda s: s.version)

    async def reset_schema(self, *, replace: bool) -> None:
        """Drop the schema if it exists; refuses a schema holding tables unless ``replace``."""
        conn = await self._connection()
        async with self._translated("reset"):
            tables = await conn.fetchval(
                "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = $1 AND c.relkind = 'r'", self.schema)
            if tables and not replace:
                raise AuditError(f"schema {self.schema!r} already holds {tables} tables; "
                                 "rebuild into a new schema or pass replace=True")
            await conn.execute(f"DROP SCHEMA IF EXISTS {quote_ident(self.schema)} CASCADE")

    # -- reading ------------------------------------------------------------------------------
    async def fetch(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        """Run a read query (tests, reports); rows as dicts."""
        conn = await self._connection()
        async with self._translated("query"):
            return [dict(r) for r in await conn.fetch(sql, *args)]

    async def latest_change_ids(self, vm_path: str | None = None, *,
                                vm_instance_uuid: str | None = None) -> list[DiskChangeId]:
        """Per disk of a VM (by inventory path or, better, instance uuid), its latest committed
        change ID. Refused commits never appear. Several VMs that had the same path over time
        each contribute their own disks (disk keys differ)."""
        if (vm_path is None) == (vm_instance_uuid is None):
            raise ValueError("give exactly one of vm_path and vm_instance_uuid")
        where = ("j.source_vm_path = $1" if vm_path is not None
                 else "j.vm_instance_uuid = $1::uuid")
        rows = await self.fetch(
            "SELECT DISTINCT ON (v.disk_key) v.disk_key, v.disk_id, v.job_id, v.disk_change_id, "
            "j.replication_type, j.committed_at FROM vm_disks v "
            "JOIN replication_jobs j ON v.job_id = j.id "
            f"WHERE {where} AND v.disk_change_id IS NOT NULL "
            "ORDER BY v.disk_key, j.committed_at DESC, v.job_id",
            vm_path if vm_path is not None else vm_instance_uuid)
        return [DiskChangeId(r["disk_key"], r["disk_id"], r["job_id"], r["disk_change_id"],
                             r["replication_type"], r["committed_at"]) for r in rows]

    async def disk_history(self, disk_key: str) -> list[HistoryEntry]:
        """Every commit of a disk (refused ones flagged), oldest first."""
        rows = await self.fetch(
            "SELECT event_id, sync_id, previous_change_id, change_id, replication_type, reason, "
            "bytes_copied, digest, committed_at, refused FROM cbt_history WHERE disk_key = $1 "
            "ORDER BY committed_at, event_id", disk_key)
        return [HistoryEntry(**r) for r in rows]

    async def schedule_events(self, *, vm: str | None = None, kinds: Sequence[str] = (),
                              policy: str | None = None, since: datetime | None = None,
                              limit: int | None = None) -> list[dict[str, Any]]:
        """Rows of ``schedule_events``, oldest first: of one VM (instance uuid, name or
        inventory path; names case-insensitive), of some kinds, of one policy, at or after
        ``since``; with ``limit``, the newest ``limit`` of them."""
        await self._require("schedule_events")
        where, args = _conditions(
            (_VM_MATCH, vm), ("kind = ANY(${n}::text[])", list(kinds) or None),
            ("policy = ${n}", policy), ("occurred_at >= ${n}", since))
        return await self._newest("schedule_events", where, args, limit)

    async def fence_events(self, *, fence_id: uuid.UUID | None = None, current: bool = False,
                           since: datetime | None = None,
                           limit: int | None = None) -> list[dict[str, Any]]:
        """Rows of ``fence_events`` (every record: issued, published again, revoked), oldest
        first; with ``current``, only the newest record of each fence (the fence as the planner
        holds it: ``revoked`` says whether it is in force)."""
        await self._require("fence_events")
        where, args = _conditions(("fence_id = ${n}", fence_id), ("occurred_at >= ${n}", since))
        source = "fence_events"
        if current:
            source = ("(SELECT DISTINCT ON (fence_id) * FROM fence_events "
                      "ORDER BY fence_id, occurred_at DESC, event_id DESC) AS f")
        return await self._newest(source, where, args, limit)

    async def vm_descriptions(self, *, vm: str | None = None, vm_snapshot: str | None = None,
                              latest: bool = False, since: datetime | None = None,
                              limit: int | None = None) -> list[dict[str, Any]]:
        """Rows of ``vm_descriptions`` (one per VM snapshot), oldest first: of one VM (instance
        uuid, name or inventory path; names case-insensitive), of one VM snapshot, described at
        or after ``since``; with ``latest``, only each VM's newest by ``taken_at`` (the one a
        failover would use). ``description`` is the ``VmDescription`` as JSON text."""
        await self._require("vm_descriptions")
        where, args = _conditions((_VM_MATCH, vm), ("vm_snapshot = ${n}", vm_snapshot),
                                  ("occurred_at >= ${n}", since))
        source = "vm_descriptions"
        if latest:
            source = ("(SELECT DISTINCT ON (vm_instance_uuid) * FROM vm_descriptions "
                      "ORDER BY vm_instance_uuid, taken_at DESC, event_id DESC) AS d")
        return await self._newest(source, where, args, limit)

    async def _newest(self, source: str, where: str, args: list[Any],
                      limit: int | None) -> list[dict[str, Any]]:
        rows = await self.fetch(
            f"SELECT * FROM {source} WHERE {where} ORDER BY occurred_at DESC, event_id DESC"
            + (f" LIMIT {int(limit)}" if limit is not None else ""), *args)
        return rows[::-1]

    async def _require(self, table: str) -> None:
        if not (await self.fetch("SELECT to_regclass($1) IS NOT NULL AS ok", table))[0]["ok"]:
            raise AuditError(f"schema {self.schema!r} has no table {table}: run `cbtstream db "
                             "migrate` (or start `cbtstream audit`, which migrates)")


def _chunks(items: Iterable[AuditRecord | tuple[str, int, int, AuditedEvent]],
            size: int) -> Iterable[list[AuditRecord]]:
    it = iter(items)
    while chunk := [AuditRecord(*r) for r in islice(it, size)]:
        yield chunk


async def rebuild(events: Iterable[tuple[str, int, int, AuditedEvent]], schema: str,
                  settings: PostgresSettings | None = None, *, replace: bool = False,
                  batch_size: int = 1000) -> int:
    """Build the audit tables from scratch in ``schema`` from ``(topic, partition, offset,
    event)`` tuples, with the live consumer's code; returns how many events were stored.

    The schema is dropped first if it exists (refused if it holds tables, unless ``replace``).
    ``settings`` defaults to the local stack's database; pass ``settings.postgres``.
    """
    async with AuditRepository(settings or PostgresSettings(), schema=schema) as repo:
        await repo.reset_schema(replace=replace)
        await repo.migrate()
        stored = 0
        for chunk in _chunks(events, batch_size):
            stored += await repo.apply(chunk)
        return stored


#: A VM by instance uuid, name (case-insensitive) or inventory path, as the listings take it.
_VM_MATCH = ("(vm_instance_uuid::text = lower(${n}) OR lower(vm_name) = lower(${n}) "
             "OR vm_path = ${n})")


def _conditions(*conds: tuple[str, Any]) -> tuple[str, list[Any]]:
    """The ``WHERE`` text of the listings and its arguments: each ``(condition, value)`` whose
    value is not None, its ``${n}`` numbered as the argument it binds."""
    where: list[str] = ["true"]
    args: list[Any] = []
    for cond, arg in conds:
        if arg is not None:
            args.append(arg)
            where.append(cond.format(n=len(args)))
    return " AND ".join(where), args
