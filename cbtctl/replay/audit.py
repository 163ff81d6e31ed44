"""``replay --rebuild-audit``: rebuild the PostgreSQL audit tables from the log into a fresh schema
with the audit consumer's own code (``consumers.audit.repository.rebuild``), then compare them
with the live tables, row by row.

Like with like: each partition is read up to the audit consumer group's committed offset, i.e.
what the live audit writer has acknowledged, so a lagging writer is not reported as a difference
(its lag is printed instead). For an exact comparison the writer should be idle while this runs.
Records the live writer could not decode are not rebuilt from their topic: the writer dead-lettered
them, and their ``DeadLetter`` is read from ``cbt.deadletter`` like any other event. Records are
read with the writer's own :func:`consumers.audit.decoding.audited_event`, on the writer's topics
(``schemas.topics.AUDITED_TOPICS``: the fences, the scheduler's events and the VM descriptions
too).

Events the log no longer holds (retention; on the compacted ``cbt.changeid.fences``, a fence's
records older than its newest once compaction has run) are rows only the live tables have.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from aiokafka import TopicPartition
from rich.console import Console
from rich.table import Table

from cbtctl.replay.reader import LogReader, RawRecord, StartAt, consumer_lag, pipeline_stages
from cbtstream.config import PostgresSettings, Settings
from consumers.audit.decoding import audited_event
from consumers.audit.projection import AuditedEvent
from consumers.audit.repository import AuditRepository, quote_ident, rebuild
from schemas.codec import EventDecodeError
from schemas.topics import AUDITED_TOPICS

#: The audit tables and their keys. ``ingested_at`` is the only column not derived from events.
TABLES: dict[str, tuple[str, ...]] = {
    "events": ("event_id",),
    "replication_jobs": ("id",),
    "vm_disks": ("job_id", "disk_id"),
    "cbt_history": ("event_id",),
    "schedule_events": ("event_id",),
    "fence_events": ("event_id",),
    "vm_descriptions": ("event_id",),
}
IGNORED_COLUMNS = frozenset({"ingested_at"})
SAMPLES = 5


@dataclass
class TableDiff:
    table: str
    live: int
    rebuilt: int
    only_live: list[dict[str, Any]] = field(default_factory=list)
    only_rebuilt: list[dict[str, Any]] = field(default_factory=list)
    only_live_count: int = 0
    only_rebuilt_count: int = 0

    @property
    def equal(self) -> bool:
        return self.only_live_count == 0 and self.only_rebuilt_count == 0


@dataclass
class AuditComparison:
    live_schema: str
    rebuilt_schema: str
    stored: int
    audit_lag: int
    tables: list[TableDiff]

    @property
    def differences(self) -> int:
        return sum(t.only_live_count + t.only_rebuilt_count for t in self.tables)


def to_events(raws: list[RawRecord]) -> list[tuple[str, int, int, AuditedEvent]]:
    """What the live writer stores: decodable events and the dead letters (not tombstones)."""
    out: list[tuple[str, int, int, AuditedEvent]] = []
    for r in raws:
        try:
            event = audited_event(r.spec, r.key, r.value)
        except EventDecodeError:
            continue
        if event is not None:
            out.append((r.topic, r.partition, r.offset, event))
    return out


async def _columns(repo: AuditRepository, table: str) -> list[str]:
    rows = await repo.fetch(
        "SELECT column_name FROM information_schema.columns WHERE table_schema = $1 AND "
        "table_name = $2 ORDER BY ordinal_position", repo.schema, table)
    return [r["column_name"] for r in rows if r["column_name"] not in IGNORED_COLUMNS]


async def compare(settings: PostgresSettings, live: str, rebuilt: str) -> list[TableDiff]:
    """Row-by-row differences of every audit table between two schemas (EXCEPT ALL both ways)."""
    out = []
    async with AuditRepository(settings, schema=live) as repo:
        for table, key in TABLES.items():
            cols = ", ".join(quote_ident(c) for c in await _columns(repo, table))
            a, b = (f"{quote_ident(s)}.{quote_ident(table)}" for s in (live, rebuilt))
            counts = await repo.fetch(
                f"SELECT (SELECT count(*) FROM {a}) AS live, (SELECT count(*) FROM {b}) AS rebuilt")
            diff = TableDiff(table, counts[0]["live"], counts[0]["rebuilt"])
            order = ", ".join(quote_ident(k) for k in key)
            for src, other, rows_attr, count_attr in ((a, b, "only_live", "only_live_count"),
                                                      (b, a, "only_rebuilt",
                                                       "only_rebuilt_count")):
                q = f"SELECT {cols} FROM {src} EXCEPT ALL SELECT {cols} FROM {other}"
                n = await repo.fetch(f"SELECT count(*) AS n FROM ({q}) d")
                setattr(diff, count_attr, n[0]["n"])
                if n[0]["n"]:
                    setattr(diff, rows_attr, await repo.fetch(
                        f"SELECT * FROM ({q}) d ORDER BY {order} LIMIT {SAMPLES}"))
            out.append(diff)
    return out


async def rebuild_audit(settings: Settings, *, schema: str | None = None,
                        keep: bool = False) -> AuditComparison:
    """Rebuild into ``schema`` (default: a fresh temporary one, dropped unless ``keep``) and
    compare with the live schema ``settings.postgres.db_schema``."""
    [lag] = await consumer_lag(settings.kafka,
                               tuple(s for s in pipeline_stages(settings) if s.name == "audit"))
    cap = {TopicPartition(p.topic, p.partition): p.committed or 0 for p in lag.partitions}
    async with LogReader(settings.kafka, AUDITED_TOPICS) as reader:
        raws = await reader.read_raw(StartAt(), cap=cap)
    live = settings.postgres.db_schema
    target = schema or f"{live}_rebuild_{uuid.uuid4().hex[:8]}"
    stored = await rebuild(to_events(raws), target, settings.postgres)
    try:
        tables = await compare(settings.postgres, live, target)
    finally:
        if not keep and schema is None:
            async with AuditRepository(settings.postgres, schema=target) as repo:
                await repo.reset_schema(replace=True)
    return AuditComparison(live, target, stored, lag.lag, tables)


def print_comparison(console: Console, cmp: AuditComparison) -> None:
    table = Table(title=f"Audit tables: live {cmp.live_schema!r} vs rebuilt from the log "
                  f"({cmp.stored} events)", title_justify="left")
    for col in ("table", "live rows", "rebuilt rows", "only live", "only rebuilt", "samples"):
        table.add_column(col)
    for t in cmp.tables:
        keys = TABLES[t.table]
        samples = [f"live {', '.join(str(r[k]) for k in keys)}" for r in t.only_live] + \
            [f"rebuilt {', '.join(str(r[k]) for k in keys)}" for r in t.only_rebuilt]
        table.add_row(t.table, str(t.live), str(t.rebuilt), str(t.only_live_count),
                      str(t.only_rebuilt_count), "\n".join(samples) or "-")
    console.print(table)
    verdict = "[green]identical[/]" if not cmp.differences else \
        f"[bold red]{cmp.differences} differing row(s)[/]"
    console.print(f"audit writer lag: {cmp.audit_lag} records; tables {verdict}")


def comparison_json(cmp: AuditComparison) -> dict[str, Any]:
    return {"type": "audit", "live_schema": cmp.live_schema,
            "rebuilt_schema": cmp.rebuilt_schema, "stored": cmp.stored,
            "audit_lag": cmp.audit_lag, "differences": cmp.differences,
            "tables": [{"table": t.table, "live": t.live, "rebuilt": t.rebuilt,
                        "only_live": t.only_live_count, "only_rebuilt": t.only_rebuilt_count,
                        "samples_live": [{k: str(r[k]) for k in TABLES[t.table]}
                                         for r in t.only_live],
                        "samples_rebuilt": [{k: str(r[k]) for k in TABLES[t.table]}
                                            for r in t.only_rebuilt]}
                       for t in cmp.tables]}
