"""Composition of a replay: read the log (adapter), keep the asked disks, replay (pure)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

from cbtctl.replay.lineage import ReplayResult, replay
from cbtctl.replay.reader import LogReader, StartAt
from cbtctl.replay.records import LogRecord
from cbtstream.config import Settings
from streams.external import Ownership


def parse_time(text: str) -> datetime:
    """ISO 8601 (``2026-11-01T00:00:00Z``); a time without zone is taken as UTC."""
    t = datetime.fromisoformat(text)
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def select(records: Iterable[LogRecord], disk: str | None = None, vm: str | None = None
           ) -> list[LogRecord]:
    """Records of one disk (by key) or one VM (instance uuid or name); all if neither."""
    out = []
    for rec in records:
        if disk is not None and rec.disk_key != disk:
            continue
        if vm is not None:
            ev = rec.event
            names = ({ev.disk.vm_instance_uuid, ev.disk.vm_name} if ev is not None
                     else {(rec.key or "").partition("/")[0]})
            if vm.lower() not in {n.lower() for n in names}:
                continue
        out.append(rec)
    return out


async def load(settings: Settings, start: StartAt, *, disk: str | None = None,
               vm: str | None = None) -> ReplayResult:
    async with LogReader(settings.kafka) as reader:
        records = await reader.read(start)
    ownership = Ownership(settings.streams.external, settings.streams.handover)
    return replay(select(records, disk, vm), complete=start.from_beginning, ownership=ownership)
