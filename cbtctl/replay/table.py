"""Rebuild the planner's ``disks`` table from the log, for when its changelog is lost.

The table's changelog (``<prefix><app id>-disks-changelog``) is the worker's only state. If it is
lost (the topic deleted, a cluster rebuilt without it), every disk looks new to the next worker:
every next sync is a full copy with reason ``no_previous_commit``. That is safe (a full copy
rewrites every byte), but it is a site-wide reseed. The log holds everything the rows were made
from, and the replay (:mod:`cbtctl.replay.lineage`) already feeds it through the worker's own
pure functions: the rows it ends with are the rows to write back.

Rules, each enforced here (``--force`` lifts the last two, never the first):

* **No worker runs.** The worker group must have no member: a running worker writes the
  changelog itself, and a row written under it would race its own.
* **The changelog is empty.** A changelog that still holds rows is the source of truth; the
  replay's rows match it in what decides plans and commits (change ID, disk identity, running
  and waiting syncs, plan generation) but not in every detail of the bounded histories.
* **The lineage is intact.** A replay that finds a break (``cbtstream replay`` lists them) means
  the log holds something the rules do not allow; an operator decides first.

Each row records, per source partition of the worker, the offset of the disk's latest record the
replay used (``DiskState.read``). A worker whose group re-reads records after its committed
offset therefore recognises them as processed: nothing is planned or refused twice.

Not rebuilt: the ``snapshots`` table of the snapshot lifecycle. A VM snapshot whose disks were
still being synced when the changelog was lost is not removed by the lifecycle; it is an orphan
that ``cbtstream snapshots prune`` (or the worker's ``streams.orphan_interval_s``) removes.
Fences are not table state: the worker reads them from their own topic.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field

from cbtctl.replay.lineage import ReplayResult, replay
from cbtctl.replay.reader import LogReader, StartAt, pipeline_stages
from cbtctl.replay.records import LogRecord
from cbtstream.config import Settings
from cbtstream.errors import CbtStreamError
from cbtstream.kafka import Publisher, ensure_topics, offset_clients, topic_partitions
from schemas.topics import CHANGEID_COMMITTED, SNAPSHOT_TAKEN, SYNC_FAILED
from streams.external import Ownership
from streams.state import DiskState, Position, to_json

#: The worker's source topics (base names): the records whose offsets a row records as read.
SOURCES = frozenset({SNAPSHOT_TAKEN.name, CHANGEID_COMMITTED.name, SYNC_FAILED.name})
#: Faust's name of the table (``streams.app.TABLE_NAME``; kept here so this command does not
#: import Faust).
TABLE_NAME = "disks"


class RebuildRefused(CbtStreamError):
    """A rule of the module docstring does not hold; nothing was written."""

    reason = "table_rebuild_refused"


@dataclass
class RebuildReport:
    """What a rebuild found and did."""

    changelog: str
    rows: dict[str, DiskState]
    breaks: int
    written: bool = False
    refused: list[str] = field(default_factory=list)


def changelog_topic(settings: Settings) -> str:
    """The ``disks`` table's changelog: ``<prefix><app id>-disks-changelog``."""
    return f"{settings.kafka.topic_prefix}{settings.streams.app_id}-{TABLE_NAME}-changelog"


def rebuilt_rows(result: ReplayResult, records: Iterable[LogRecord]) -> dict[str, DiskState]:
    """The row of every disk the replay knows, with ``read`` set to the offset of the disk's
    latest record in each source partition of the worker. Pure."""
    latest: dict[str, dict[tuple[str, int], int]] = {}
    for rec in records:
        key = rec.disk_key
        if rec.topic_name not in SOURCES or key is None:
            continue
        seen = latest.setdefault(key, {})
        where = (rec.coord.topic, rec.coord.partition)
        seen[where] = max(seen.get(where, -1), rec.coord.offset)
    rows: dict[str, DiskState] = {}
    for key, lineage in result.disks.items():
        state = lineage.state
        if state is None:
            continue
        for (topic, partition), offset in sorted(latest.get(key, {}).items()):
            state = state.with_read(Position(topic, partition, offset))
        rows[key] = state
    return rows


async def _worker_members(settings: Settings) -> int:
    """How many members the worker group has now (0: no worker runs)."""
    group = pipeline_stages(settings)[0].group
    async with offset_clients(settings.kafka) as (admin, _):
        described = await admin.describe_consumer_groups([group])
    members = 0
    for response in described:
        for g in response.groups:
            # (error_code, group_id, state, protocol_type, protocol, members[, ...])
            if g[1] == group:
                members += len(g[5])
    return members


async def _changelog_records(settings: Settings, topic: str) -> int:
    """Records in the changelog now (0 when it does not exist)."""
    async with offset_clients(settings.kafka) as (admin, consumer):
        if topic not in set(await admin.list_topics()):
            return 0
        tps = await topic_partitions(consumer, topic, timeout_s=10.0)
        begin = await consumer.beginning_offsets(tps)
        end = await consumer.end_offsets(tps)
    return sum(end[tp] - begin[tp] for tp in tps)


async def rebuild_table(settings: Settings, *, write: bool, force: bool = False
                        ) -> RebuildReport:
    """Replay the whole log and, with ``write``, write each disk's row to the empty changelog
    (see the module docstring for the rules). Raises :class:`RebuildRefused`."""
    topic = changelog_topic(settings)
    members = await _worker_members(settings)
    if members:
        raise RebuildRefused(
            f"{members} planner worker(s) are running (group "
            f"{pipeline_stages(settings)[0].group}): stop every worker first")
    async with LogReader(settings.kafka) as reader:
        records = await reader.read(StartAt())
    ownership = Ownership(settings.streams.external, settings.streams.handover)
    result = replay(records, complete=True, ownership=ownership)
    report = RebuildReport(topic, rebuilt_rows(result, records), len(result.breaks))
    present = await _changelog_records(settings, topic)
    if present:
        report.refused.append(f"the changelog {topic} holds {present} records: it is the "
                              "table, not lost")
    if report.breaks:
        report.refused.append(f"the replay found {report.breaks} lineage breaks (see "
                              "`cbtstream replay`)")
    if not write:
        return report
    if report.refused and not force:
        raise RebuildRefused("; ".join(report.refused) + " (--force writes anyway)")
    k = settings.kafka
    await ensure_topics(k, {topic: (k.partitions, {"cleanup.policy": "compact"})})
    # The default partitioner hashes the key as every publisher of the source topics does, so
    # each row lands in the partition of its disk's events (Faust's co-partitioning).
    async with Publisher(k) as pub:
        for key, state in sorted(report.rows.items()):
            await pub.publish_raw(topic, key.encode(), json.dumps(to_json(state)).encode(), [])
    report.written = True
    return report
