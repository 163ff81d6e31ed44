"""The planner worker's Faust application: :func:`build`, the composition root (the Faust app,
its two tables, two internal topics, six agents, web pages and timers, registered in order), and
:class:`PlannerApp`, what its agents run: read the disk's row, run the pure step
(``streams.planner``), write the row, hand the outputs to the outbox.

Faust stays inside ``streams/`` (``tests/unit/test_layers.py`` checks it), so ``producers/``,
``consumers/`` and ``schemas/`` would survive its replacement. Within ``streams/`` it is imported
by this module, ``streams.durable`` (the ``disks`` table and its outbox), ``streams.recovery``
(the overrides of Faust's internals), ``streams.worker`` (the process), ``streams.api``,
``streams.store_api``, ``streams.orphans`` and ``streams.metrics`` (web pages), and
``streams.watchdog`` and ``streams.timeouts`` (timers). The rules they feed (``streams.planner``,
``streams.guard``, ``streams.state``, ``streams.lifecycle``, ``streams.external``,
``streams.fence``) do not import it.

Delivery: at-least-once. For each input record an agent reads the disk's row, runs the pure
step (``streams.planner``), writes the new row (table changelog) if it changed, with the input's
offset recorded in it (``DiskState.read``: a record at or below it is a redelivery), and hands the
outputs and lifecycle notices to the outbox (``streams.durable``), which sends them once the row
is acknowledged; Faust commits the input offset after the outbox is drained and its producer
flushed, and never past the last record processed (``commit_limit``, ``streams.recovery``).
The row write and the sends are not atomic: a crash in between leaves a row that has seen the input
while its outputs are lost. The input's offset was not committed, so it is redelivered, and the
planner's re-emission rule (``streams.planner``: outputs are a function of row and input, also for
an input already seen) publishes the same events again (same ids); consumers drop the duplicates.

What this relies on in faust-streaming 0.15 (read in its source, ``faust/transport/consumer.py``
``Consumer._commit_offsets``): an event's offset becomes committable only once the agent moved
past it (acked after our handler returned), and every commit first awaits
``app.producer.flush()``, which drains Faust's buffer of table writes and then awaits aiokafka's
``flush()`` (every batch queued so far delivered, acks=-1). Our sends are not awaited one by
one: ``Topic.send`` returns once the record is in aiokafka's accumulator, in call order, and
aiokafka keeps one request in flight per partition, so records of one disk (one partition) keep
their order. Known limits, from the same source: a record whose delivery fails after the
producer's retries (``producer_request_timeout``) is only logged by Faust and the commit goes on.
``ProducerBuffer.flush`` (the table writes) gave up waiting after 0.1 s without progress, letting
a commit pass unwritten rows: ``streams.recovery.install_full_flush`` fixes that, and
``streams.recovery.SeekFirstRecovery`` the records dropped after an assignment.

Every topic, including the table's changelog ``<app id>-disks-changelog``, has
``settings.kafka.partitions`` partitions and is keyed by disk key, so a row always lives in the
partition of the events that change it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import faust
from faust.types import EventT, TableT
from pydantic import BaseModel, ValidationError

from cbtstream.config import Settings
from cbtstream.kafka import group_progress, ssl_context
from cbtstream.log import bind_disk
from schemas.codec import (
    MAX_REQUEST_BYTES,
    EventDecodeError,
    dead_letter_record,
    decode,
    encode,
)
from schemas.events import (
    ChangeIdCommitted,
    SnapshotRemoved,
    SnapshotTaken,
    SyncFailed,
    SyncProgress,
    stable_event_id,
)
from schemas.topics import (
    CHANGEID_COMMITTED,
    DEADLETTER,
    SNAPSHOT_TAKEN,
    SYNC_FAILED,
    SYNC_PROGRESS,
    TopicSpec,
    topic_for,
)
from streams import external, holds, lifecycle, planner
from streams.api import authorized, register_api
from streams.durable import DurableTable, Outbox
from streams.fences import FenceBook
from streams.gather import Gatherer, register_shards
from streams.holds import HoldBook
from streams.lifecycle import Notice, SnapshotRemover, SnapshotRow
from streams.metrics import PlannerMetrics, register_metrics
from streams.orphans import OrphanReconciler, register_orphans
from streams.pools import PoolMove, PoolView, as_move, register_pool_survey
from streams.recovery import (
    TableManager,
    install_commit_guard,
    install_full_flush,
    limit_commits,
    on_flush,
    on_seeked,
)
from streams.removals import Removals
from streams.shards import TableQueries, register_status
from streams.state import DiskState, Position, from_json, new_state, to_json
from streams.status import StatusCache
from streams.store_api import StoreService, register_store_api
from streams.timeouts import SyncCheck, register_sync_checks
from streams.watchdog import register_watchdog

log = logging.getLogger("cbtstream.streams")

TABLE_NAME = "disks"
SNAPSHOTS_TABLE = "snapshots"
#: Seconds a stopping worker lets its snapshot removals already running finish (within the
#: stop deadline) before it cancels them.
REMOVAL_GRACE_S = 3.0
#: The source topics with an agent that writes rows: their commits are capped by the commit
#: guard (``PlannerApp.commit_limit``) and the watchdog re-reads them when stalled, together
#: with the two internal topics. Not ``cbt.sync.progress``: advisory, its agent writes nothing.
SOURCE_TOPICS = (SNAPSHOT_TAKEN, CHANGEID_COMMITTED, SYNC_FAILED)


def build(settings: Settings, remover: SnapshotRemover | None = None,
          orphans: OrphanReconciler | None = None) -> PlannerApp:
    """Build the planner worker; the body is the list of what it runs.

    The order is the one the worker always had, kept where Faust makes it observable: the
    process-wide overrides (``streams.recovery``) are installed before the app exists; Faust
    keeps its tables, agents, signal receivers, tasks and timers in the order they are
    registered here (the ``disks`` table before ``snapshots``; the lifecycle agent, the three
    source agents, the sync-check agent, then the progress agent; the fence reader before the
    orphan reconciler, the watchdog and the sync-check timer). Only the ``/metrics`` page moved
    up (the pages have distinct paths, so their order is free). Nothing here reads the
    environment: ``settings`` comes from the worker command."""
    k, s = settings.kafka, settings.streams
    install_full_flush()  # offset commits wait for every row write (streams/recovery.py)
    install_commit_guard()  # ... and never pass a record we did not process
    app_id = f"{k.topic_prefix}{s.app_id}"
    app = _faust_app(settings, app_id)
    table = _disks_table(app, k.partitions)
    outbox = Outbox(table)
    on_flush(app, outbox.drain)  # no offset commit before the outbox is empty
    snapshots = _snapshots_table(app, k.partitions)
    metrics = register_metrics(app)
    token = settings.api.token
    secret = token.get_secret_value() if token else None
    gatherer = Gatherer(app, table, k.partitions, secret)  # the whole table, from every worker
    pa = PlannerApp(  # pa: what the registrations below run
        settings, app, table=table, gatherer=gatherer, outbox=outbox, snapshots=snapshots,
        lifecycle_topic=_internal_topic(app, f"{app_id}-snapshot-lifecycle", k.partitions),
        checks_topic=_internal_topic(app, f"{app_id}-sync-checks", k.partitions),
        fences=FenceBook(k), holds=HoldBook(k),
        ownership=external.Ownership(s.external, s.handover),
        metrics=metrics, remover=remover)
    metrics.rows = pa.rows  # the table's series, read at each scrape
    app.agent(pa.lifecycle_topic, name="on_snapshot_lifecycle")(pa.lifecycle_agent)
    pa.source_agent(SNAPSHOT_TAKEN, (SnapshotTaken,), pa.on_snapshot)
    pa.source_agent(CHANGEID_COMMITTED, (ChangeIdCommitted,), pa.on_commit)
    pa.source_agent(SYNC_FAILED, (SyncFailed,), pa.on_failed)
    limit_commits(app, pa.commit_limit)
    on_seeked(app, pa.starts_at)
    app.agent(pa.checks_topic, name="on_sync_check")(pa.checks_agent)
    app.on_partitions_revoked.connect(pa.forget_delivered)
    app.on_partitions_assigned.connect(pa.forget_processed)
    app.agent(pa.topic(SYNC_PROGRESS), name="on_sync_progress")(pa.progress_agent)
    app.task(pa.fences.run)
    app.task(pa.holds.run)
    if pa.removals is not None:
        app.task(pa.sweep_removals)
    table.on_recover(pa.warm)  # before the worker says it is ready
    def auth(header: str | None) -> bool:
        return authorized(header, secret)

    queries = TableQueries(gatherer, pa)
    register_shards(app, gatherer, auth)
    register_api(app, secret, queries.rows, queries.row, gatherer.ready)
    store = StoreService(queries.store_rows, queries.row, pa.send, pa.ownership)
    register_store_api(app, store, authorized=auth)
    register_status(app, queries, auth)
    register_orphans(app, settings, queries.needs, pa.send, orphans, metrics.observe_reconcile,
                     leads=queries.leads, authorized=auth)
    register_watchdog(app, set(pa.sources), metrics.observe_watchdog)
    register_pool_survey(app, settings, table, pa.pools, metrics.observe_pools)
    if s.sync_timeout_s > 0:
        register_sync_checks(app, table, pa.checks_topic, pa.progress,
                             timeout_s=s.sync_timeout_s, interval_s=s.sync_check_interval_s,
                             unserved=pa.pools.unserved, pool_waited=pa.pools.waited)
    return pa


def _credentials(settings: Settings) -> Any:
    k = settings.kafka
    ctx = ssl_context(k)
    if k.sasl_mechanism:
        password = k.sasl_password.get_secret_value() if k.sasl_password else ""
        return faust.SASLCredentials(
            username=k.sasl_username or "",
            password=password,
            mechanism=k.sasl_mechanism,
            ssl_context=ctx,
        )
    if ctx is not None:
        return faust.SSLCredentials(ctx)
    return None


def _faust_app(settings: Settings, app_id: str) -> faust.App:
    """The Faust app (its id ``app_id`` is the consumer group and the prefix of its internal
    topics), configured from ``settings``."""
    k = settings.kafka
    s = settings.streams
    return faust.App(
        app_id,
        broker=[f"kafka://{h.strip()}" for h in k.bootstrap_servers.split(",")],
        broker_credentials=_credentials(settings),
        store="memory://",
        topic_partitions=k.partitions,
        topic_replication_factor=k.replication_factor,
        web_host=s.web_host,
        web_bind=s.web_host,
        web_port=s.web_port,
        datadir=str(s.data_dir / app_id),
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        producer_max_request_size=MAX_REQUEST_BYTES,  # a dead letter may be large
        # Batch the per-event sends (row, plan, lifecycle) instead of one request each.
        producer_linger=0.03,
        autodiscover=False,
        # Seek before resume after every assignment (streams/recovery.py).
        TableManager=TableManager,
        # Quick failover: a killed worker's partitions move within the session timeout.
        broker_session_timeout=s.session_timeout_s,
        broker_heartbeat_interval=s.heartbeat_interval_s,
        broker_rebalance_timeout=max(20.0, 2 * s.session_timeout_s),
        consumer_group_instance_id=s.group_instance_id,
    )


def _disks_table(app: faust.App, partitions: int) -> DurableTable:
    """The ``disks`` table. Its rows are awaited before the outputs they imply are sent
    (streams/durable.py)."""
    table = DurableTable(
        app,
        name=TABLE_NAME,
        default=None,
        beacon=app.tables.beacon,
        partitions=partitions,
        # bytes keys -> "raw" key codec for the table AND its changelog (a Schema here
        # would leave the changelog on JSON keys and break recovery).
        key_type=bytes,
        help="Latest committed change ID and sync state per disk key.",
    )
    app.tables.add(table)
    return table


def _snapshots_table(app: faust.App, partitions: int) -> TableT[bytes, Any]:
    """The ``snapshots`` table (``streams.lifecycle``)."""
    return app.Table(
        SNAPSHOTS_TABLE,
        default=None,
        partitions=partitions,
        # bytes keys -> "raw" key codec for the table AND its changelog (a Schema here
        # would leave the changelog on JSON keys and break recovery).
        key_type=bytes,
        help="Per VM snapshot: the disks it covers and those finished with it.",
    )


def _internal_topic(app: faust.App, name: str, partitions: int) -> faust.TopicT:
    """A topic of the worker's own (keyed by disk or VM snapshot, raw bytes)."""
    return app.topic(name, key_type=bytes, value_type=bytes, key_serializer="raw",
                     value_serializer="raw", partitions=partitions, internal=True)


class RowChanged(Exception):
    """A step was about to write a row that another agent wrote after the step read it."""


class PlannerApp:
    """The planner's Faust side: what the agents, pages and timers wired by :func:`build` run.

    Named ``PlannerApp``, not ``Planner``: ``streams.planner`` is the module of the pure planning
    rules this class feeds, and one name for both read as if they were the same thing."""

    def __init__(self, settings: Settings, app: faust.App, *, table: DurableTable,
                 gatherer: Gatherer, outbox: Outbox, snapshots: TableT[bytes, Any],
                 lifecycle_topic: faust.TopicT,
                 checks_topic: faust.TopicT, fences: FenceBook, holds: HoldBook,
                 ownership: external.Ownership, metrics: PlannerMetrics,
                 remover: SnapshotRemover | None = None) -> None:
        self.settings = settings
        self.app = app
        self.table = table
        #: Which table partitions this worker holds, and the key of each row's partition.
        self.gatherer = gatherer
        self.outbox = outbox
        self.snapshots = snapshots
        self.lifecycle_topic = lifecycle_topic
        self.checks_topic = checks_topic
        #: Every change-ID fence (streams/fences.py); :func:`build` runs its reader.
        self.fences = fences
        #: Every VM's replication hold (streams/holds.py): a failed-over VM gets no plan.
        self.holds = holds
        self.ownership = ownership
        self.metrics = metrics
        #: Snapshot removals in flight (``streams.removals``); None: snapshots are not removed.
        self.removals = None if remover is None else Removals(
            remover, self.announce, concurrency=settings.streams.remove_concurrency)
        self._topics: dict[str, faust.TopicT] = {}
        #: Offset of the last record delivered per source partition in this process (a forward
        #: jump means records were skipped; a backward one is a redelivery after a rebalance).
        self._delivered: dict[tuple[str, int], int] = {}
        self._topic_of: dict[type, faust.TopicT] = {}
        #: Per source partition, the last offset processed since this worker was assigned it,
        #: without a gap (a record skipped holds it back): the highest commit allowed is one
        #: past it (``commit_limit``); also read by ``snapshots_processed``.
        self._processed: dict[tuple[str, int], int] = {}
        #: Decoded ``disks`` rows: key -> (the table's JSON value, its DiskState). See ``row``.
        self._decoded: dict[bytes, tuple[object, DiskState]] = {}
        #: The same for the ``snapshots`` table.
        self._snapshot_rows: dict[bytes, tuple[object, SnapshotRow]] = {}
        #: The topics whose commits the guard limits (``commit_limit``): ``SOURCE_TOPICS`` and
        #: the two internal topics.
        self.sources: frozenset[str] = frozenset({
            *(spec.full_name(settings.kafka.topic_prefix) for spec in SOURCE_TOPICS),
            lifecycle_topic.get_topic_name(), checks_topic.get_topic_name()})
        #: Time of the latest SyncProgress seen per running sync (memory only: a new owner of
        #: the partition starts counting silence from its own first check).
        self.progress: dict[uuid.UUID, datetime] = {}
        #: The latest SyncProgress of each running sync and when it was heard (memory only, for
        #: the status: queued or running, bytes, queue place; ``streams.status``).
        self.reports: dict[uuid.UUID, tuple[SyncProgress, datetime]] = {}
        #: Live copiers per pool and the syncs waiting for a pool without one
        #: (``streams.pools``; refreshed by its timer).
        self.pools = PoolView()
        #: The row-only part of each row's status (``GET /api/v1/status``), made when the row is
        #: written or recovered (:meth:`warm`) rather than at the first request.
        self.status_cache = StatusCache()

    def kafka_topics(self) -> dict[str, tuple[int, dict[str, str]]]:
        """Every topic the worker consumes or writes, with its partitions and config: our
        source topics and Faust's internal ones (table changelogs, compacted; the lifecycle
        topic; the assignor's leader topic), so they can be created before Faust starts."""
        k = self.settings.kafka
        parts = k.partitions
        topics = {self.topic(spec).get_topic_name(): (parts, dict(spec.config))
                  for spec in (*SOURCE_TOPICS, SYNC_PROGRESS)}
        for table in (self.table, self.snapshots):
            topics[table.changelog_topic.get_topic_name()] = (
                parts, {"cleanup.policy": "compact"})
        topics[self.lifecycle_topic.get_topic_name()] = (parts, {})
        # a check matters for minutes: a day covers any outage worth recovering from
        topics[self.checks_topic.get_topic_name()] = (parts, {"retention.ms": str(86_400_000)})
        topics[f"{self.app.conf.id}-__assignor-__leader"] = (1, {})
        return topics

    # -- topics ---------------------------------------------------------------------------------
    def topic(self, spec: TopicSpec) -> faust.TopicT:
        if spec.name not in self._topics:
            self._topics[spec.name] = self.app.topic(
                spec.full_name(self.settings.kafka.topic_prefix),
                key_type=bytes,
                value_type=bytes,
                key_serializer="raw",
                value_serializer="raw",
                partitions=self.settings.kafka.partitions,
                config=dict(spec.config),
            )
        return self._topics[spec.name]

    async def send(self, event: BaseModel) -> None:
        """Hand the event to Faust's producer (returns once it is queued, not acknowledged:
        Faust flushes its producer before it commits the input offset)."""
        key, value, headers = encode(event)
        topic = self._topic_of.get(type(event))
        if topic is None:
            topic = self._topic_of[type(event)] = self.topic(topic_for(event))
        await topic.send(key=key, value=value, headers=headers)

    # -- rows -----------------------------------------------------------------------------------
    def row(self, key: bytes) -> DiskState | None:
        """The disk's row, decoded. The table holds JSON (what its changelog carries); the decoded
        row is cached next to the very object it was decoded from, so a row replaced behind our
        back (changelog recovery after a rebalance) is never served stale."""
        raw = self.table.get(key)
        cached = self._decoded.get(key)
        if cached is not None and cached[0] is raw:
            return cached[1]
        state = from_json(raw)
        if raw is not None and state is not None:
            self._decoded[key] = (raw, state)
        return state

    def rows(self) -> list[DiskState]:
        """Every row of the table partitions this worker holds now. Not simply the table's
        keys: Faust's memory store keeps the rows this worker wrote in a partition that has
        moved to another worker since (``streams.gather``)."""
        return [s for _, s in self.keyed_rows()]

    def keyed_rows(self) -> list[tuple[str, DiskState]]:
        """The same rows with their disk keys."""
        out = []
        for k in self.gatherer.owned(list(self.table.keys())):
            s = self.row(k)
            if s is not None:
                out.append((k.decode(), s))
        return out

    async def snapshots_processed(self) -> bool:
        """Whether this worker's rows name every sync that needs a VM snapshot in its
        partitions: it holds some (recovered, not rebalancing) and every ``SnapshotTaken``
        published so far to them was processed, by it or, below the group's committed offset,
        by an earlier owner whose rows it recovered. Until then a snapshot may look unneeded
        only because its event waits in the backlog (a worker catching up after downtime), so
        no orphan may be judged. That the workers' partitions are all of them is checked where
        their parts are gathered (``streams.gather``)."""
        k = self.settings.kafka
        topic = self.topic(SNAPSHOT_TAKEN).get_topic_name()
        held = self.gatherer.held()
        assigned = {tp.partition for tp in self.app.consumer.assignment() if tp.topic == topic}
        if (not held or not held <= assigned or self.app.rebalancing
                or not cast(Any, self.app.tables).recovery.completed.is_set()):
            return False
        end, committed = await group_progress(k, self.app.conf.id, topic)
        return all(p in end and max(committed.get(p, 0),
                                    self._processed.get((topic, p), -1) + 1) >= end[p]
                   for p in held)

    def put(self, key: bytes, state: DiskState | None) -> None:
        if state is not None:
            raw = to_json(state)
            self.table[key] = raw
            self._decoded[key] = (raw, state)
            self.gatherer.partition_of(key)
            self.status_cache.get(key.decode(), state)

    async def warm(self) -> None:
        """Decode the rows of the partitions this worker holds, with their partition and the
        row-only part of their status, once the table is recovered (the worker is not ready
        before): the first ``GET /api/v1/status`` after a start or a rebalance would otherwise
        pay for all of them (about a second for 7,500 rows). Rows already cached cost a
        lookup. Yields to the loop between batches."""
        keys = list(self.table.keys())
        for start in range(0, len(keys), 500):
            if start:
                await asyncio.sleep(0)
            for k in self.gatherer.owned(keys[start:start + 500]):
                s = self.row(k)
                if s is not None:
                    self.status_cache.get(k.decode(), s)

    # -- agents ---------------------------------------------------------------------------------
    def source_agent(
        self,
        spec: TopicSpec,
        expect: tuple[type[BaseModel], ...],
        handle: Callable[[bytes, Any, Position], Awaitable[None]],
    ) -> None:
        """Register the agent ``on_<topic>`` of a source topic: each record is decoded (as one
        of ``expect``, else dead-lettered) and handed to ``handle`` with its position."""
        topic = self.topic(spec)

        # A coroutine, not an async generator: Faust then awaits it instead of iterating what
        # it yields (which costs a debug log line and a reply check per event).
        async def agent(stream: faust.StreamT[bytes]) -> None:
            async for event in stream.events():
                await self._dispatch(spec, expect, handle, event)

        agent.__name__ = agent.__qualname__ = f"on_{spec.name.replace('.', '_')}"
        self.app.agent(topic, name=agent.__name__)(agent)

    async def _dispatch(
        self,
        spec: TopicSpec,
        expect: Sequence[type[BaseModel]],
        handle: Callable[[bytes, Any, Position], Awaitable[None]],
        event: EventT[bytes],
    ) -> None:
        msg = event.message
        tpk = (msg.topic, msg.partition)
        last = self._delivered.get(tpk)
        if last is not None and msg.offset > last + 1:
            # Our source topics have no gaps (not compacted, no transactions): records were
            # skipped. Seen with faust's stale read offsets; streams/recovery.py prevents it.
            log.warning("source records skipped", extra={
                "topic": msg.topic, "partition": msg.partition, "after": last,
                "offset": msg.offset})
            self.metrics.observe_skipped(msg.topic, msg.offset - last - 1)
        self._delivered[tpk] = msg.offset
        try:
            parsed = decode(msg.value, key=msg.key, expect=tuple(expect))
        except EventDecodeError as exc:
            await self.dead_letter(msg.topic, msg.partition, msg.offset, msg.key, msg.value,
                                   str(exc))
        else:
            disk_key = parsed.disk.key  # a computed property: derive it once per event
            with bind_disk(disk_key):
                for attempt in range(3):
                    try:
                        await handle(disk_key.encode(), parsed,
                                     Position(msg.topic, msg.partition, msg.offset))
                        break
                    except RowChanged as exc:
                        if attempt == 2:
                            raise
                        log.error("planner step run again", extra={"error": str(exc)})
        self._mark(msg.topic, msg.partition, msg.offset)

    def _mark(self, topic: str, partition: int, offset: int) -> None:
        """The record at ``offset`` is processed (its row written, its sends queued)."""
        tpk = (topic, partition)
        mark = self._processed.get(tpk)
        if mark is None or offset == mark + 1:
            self._processed[tpk] = offset
        # else: a redelivery (at or below the mark), or a record after a gap, which holds the
        # commits back until the gap is read (the watchdog re-reads a stalled partition)

    async def dead_letter(
        self, topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None,
        error: str,
    ) -> None:
        k, v, headers = dead_letter_record(topic, partition, offset, key, value, error, "planner")
        log.warning("dead letter", extra={"topic": topic, "partition": partition,
                                          "offset": offset, "error": error[:300]})
        await self.topic(DEADLETTER).send(key=k, value=v, headers=headers)
        self.metrics.observe_dead_letter()

    async def _step(self, key: bytes, before: DiskState | None, step: planner.Step,
                    source: str, position: Position | None = None) -> None:
        """Write the row (if the step changed it, with the input's ``position`` recorded as
        processed), send the step's outputs and lifecycle notices (only for snapshots the
        pipeline removes: see ``streams.lifecycle``). The same sends happen for a redelivered
        input: see the module docstring."""
        now = self.row(key)
        if now is not before and now != before:
            # The row was read before an await and another agent wrote it meanwhile: writing
            # this step would undo that write (a commit applied, then overwritten by a
            # snapshot step that still saw the sync running). Nothing was written or sent yet;
            # the dispatcher runs the input again on the current row.
            raise RowChanged(f"row of {key.decode()} changed while its {source} step ran")
        if step.state is not before:
            state = step.state
            if state is not None and position is not None:
                if before is not None and before.processed(position):
                    log.warning("input at an offset already processed changed the row "
                                "(topic recreated or offsets reset past a lost row?)", extra={
                                    "topic": position.topic, "partition": position.partition,
                                    "offset": position.offset, "kind": step.kind})
                state = state.with_read(position)
            self.put(key, state)
        if step.kind not in ("applied", "idle"):
            log.info("planner step", extra={"input": source, "kind": step.kind,
                                            "outputs": len(step.outputs)})
        verbose = log.isEnabledFor(logging.INFO)
        sends: list[Callable[[], Awaitable[Any]]] = []
        for o in step.outputs:
            if verbose:
                log.info(o.event_type,
                         extra={"event": o.model_dump(mode="json", exclude={"disk"})})
            sends.append(functools.partial(self.send, o))
        for n in lifecycle.notices(step.ended):
            sends.append(functools.partial(self.lifecycle_topic.send, key=n.key,
                                           value=n.model_dump_json().encode()))
        # Sent once the row is acknowledged (also an unchanged row: an earlier step may have
        # written it without outputs), in step order: streams/durable.py.
        await self.outbox.put(key, sends)
        self.metrics.observe_step(source, step.kind, step.outputs)

    async def _books_ready(self) -> None:
        """Wait until the fence and hold books have read their topics. Called before the row is
        read: the row must be read, stepped and written with no ``await`` in between (another
        agent, e.g. the commit agent, may write the same row while this one waits)."""
        await self.fences.wait_ready()
        await self.holds.wait_ready()

    async def on_snapshot(self, key: bytes, ev: SnapshotTaken, at: Position) -> None:
        await self._books_ready()
        before = self.row(key)
        row = before if before is not None else new_state(ev.disk)
        hold = self.holds.hold_of(ev.disk.vm_instance_uuid)
        if hold is not None:  # failed or cut over: the replica is the operator's
            await self._step(key, before, holds.refuse_snapshot(
                row, ev, datetime.now(UTC), holds.hold_detail(hold), holds.HELD[hold.state]),
                "snapshot", at)
            return
        if self.ownership.owned_externally(row):  # its external copier copies it
            await self._step(key, before, external.skip_snapshot(row, ev, datetime.now(UTC)),
                             "snapshot", at)
            return
        configured = self.settings.pools.pool_for(ev.disk.key)
        if row.pool is not None and row.pool != configured:
            log.warning("disk stays in its pool; [pools] names another (cbtstream pools move "
                        "moves it, at the cost of a full copy)", extra={
                            "disk_key": ev.disk.key, "pool": row.pool, "configured": configured})
        await self._step(key, before, planner.snapshot_step(
            before, ev, datetime.now(UTC), self.fences.active(), row.processed(at),
            configured), "snapshot", at)

    async def on_commit(self, key: bytes, ev: ChangeIdCommitted, at: Position) -> None:
        await self._books_ready()
        before = self.row(key)
        if ev.origin == external.EXTERNAL:
            await self._step(key, before, external.apply_external(
                before, ev, datetime.now(UTC), self.ownership), "commit", at)
            return
        step = planner.commit_step(before, ev, datetime.now(UTC), self.fences.active(),
                                   before is not None and before.processed(at))
        if step.kind == "applied":
            log.info("commit applied", extra={"change_id": ev.change_id,
                                              "sync_id": str(ev.sync_id)})
        self.progress.pop(ev.sync_id, None)
        self.reports.pop(ev.sync_id, None)
        await self._step(key, before, step, "commit", at)

    async def on_failed(self, key: bytes, ev: SyncFailed, at: Position) -> None:
        if ev.sync_id is not None:
            self.progress.pop(ev.sync_id, None)
            self.reports.pop(ev.sync_id, None)
        await self._books_ready()
        before = self.row(key)
        await self._step(key, before, planner.failed_step(
            before, ev, datetime.now(UTC), self.fences.active()), "failure", at)

    def commit_limit(self, topic: str, partition: int) -> int | None:
        """The highest offset the group may commit for a partition (``streams.recovery``'s
        commit guard): one past the last record processed without a gap since the assignment;
        -1 (nothing) for a source partition with none; None for the partitions of other agents
        (Faust's own bookkeeping)."""
        if topic not in self.sources:
            return None
        mark = self._processed.get((topic, partition))
        return -1 if mark is None else mark + 1

    def forget_processed(self, sender: Any, /, *args: Any, signal: Any,
                          **kwargs: Any) -> None:
        """A new assignment: what this worker processed before may have moved on elsewhere."""
        self._processed.clear()

    def starts_at(self, offsets: dict[Any, int]) -> None:
        """The assigned partitions are seeked: each one's processing starts at its committed
        offset, so a first record delivered past it (Faust dropped the one at the committed
        offset) is a gap that holds the commits back until the watchdog re-reads it, instead
        of a new base the commits would pass the lost record from."""
        for tp, offset in offsets.items():
            if tp.topic in self.sources and offset > 0:
                self._processed[(tp.topic, tp.partition)] = offset - 1

    def forget_delivered(self, sender: Any, /, *args: Any, signal: Any,
                          **kwargs: Any) -> None:
        """A partition may come back after others processed it: its next offset is not news."""
        self._delivered.clear()

    # -- silent syncs ---------------------------------------------------------------------------
    async def progress_agent(self, stream: faust.StreamT[bytes]) -> None:
        """Remember when each running sync last reported progress (no table write: progress
        only postpones a time-out)."""
        async for event in stream.events():
            msg = event.message
            try:
                ev = decode(msg.value, key=msg.key, expect=(SyncProgress,))
            except EventDecodeError:
                continue  # progress is advisory (the copier's own topic): never dead-lettered
            assert isinstance(ev, SyncProgress)
            if len(self.progress) > 100_000:
                self.progress.clear()  # bounded: forgetting progress only delays nothing
                self.reports.clear()  # ... and shows the syncs planned until their next report
            heard = datetime.now(UTC)
            self.progress[ev.sync_id] = heard
            self.reports[ev.sync_id] = (ev, heard)

    async def checks_agent(self, stream: faust.StreamT[bytes]) -> None:
        """Decide the time-out checks the timer sent (keyed by disk, so in the disk's
        partition); the decision time travels in the record, so a redelivered check decides
        the same and republishes the same outputs."""
        timeout = timedelta(seconds=self.settings.streams.sync_timeout_s)
        async for event in stream.events():
            msg = event.message
            try:
                move = as_move(msg.value)
            except ValidationError as exc:  # a hand-made record: refused, never a crash
                await self.dead_letter(msg.topic, msg.partition, msg.offset, msg.key, msg.value,
                                       f"not a pool move: {exc.error_count()} errors")
                self._mark(msg.topic, msg.partition, msg.offset)
                continue
            if move is not None:
                await self._move(move)
                self._mark(msg.topic, msg.partition, msg.offset)
                continue
            check = SyncCheck.model_validate_json(msg.value)
            key = check.disk_key.encode()
            seen = self.progress.get(check.sync_id)
            last = max((t for t in (check.last_progress, seen) if t is not None), default=None)
            before = self.row(key)
            with bind_disk(check.disk_key):
                step = planner.timeout_step(before, check.sync_id, check.at, timeout, last,
                                            self.fences.active())
                if step.kind in ("reissued", "timed_out"):
                    log.warning("silent sync " + step.kind, extra={
                        "sync_id": str(check.sync_id), "last_progress": str(last),
                        "checked_at": check.at.isoformat()})
                await self._step(key, before, step, "check")
            self._mark(msg.topic, msg.partition, msg.offset)

    async def _move(self, move: PoolMove) -> None:
        """An operator's pool move (``cbtstream pools move``), in the disk's partition."""
        key = move.disk_key.encode()
        before = self.row(key)
        with bind_disk(move.disk_key):
            step = planner.move_step(before, move.pool)
            log.warning("disk moved to another pool: its next sync is a full copy there"
                        if step.kind == "pool_moved" else "pool move changes nothing", extra={
                            "from": before.pool if before else None, "to": move.pool,
                            "requested_by": move.requested_by, "known": before is not None})
            await self._step(key, before, step, "pool_move")

    # -- snapshot lifecycle ---------------------------------------------------------------------
    async def lifecycle_agent(self, stream: faust.StreamT[bytes]) -> None:
        async for event in stream.events():
            msg = event.message
            await self._lifecycle(msg.value)
            self._mark(msg.topic, msg.partition, msg.offset)

    async def _lifecycle(self, value: bytes) -> None:
        """One notice: the VM snapshot's row; a complete row goes to the removals, whose
        ``removed`` notice marks it and tells each disk (``SnapshotRemoved``)."""
        notice = Notice.model_validate_json(value)
        key = notice.key
        before = self.snapshot_row(key)
        if notice.kind == "removed":
            await self._removed(key, before)
            return
        row = lifecycle.apply(before, notice)
        with bind_disk(notice.disk.key):
            log.info("snapshot lifecycle", extra={
                "vm_snapshot": notice.vm_snapshot, "kind": notice.kind,
                "outcome": notice.outcome, "finished": sorted(row.finished),
                "expected": row.expected, "removed": row.removed})
        raw = row.model_dump(mode="json")
        self.snapshots[key] = raw
        self._snapshot_rows[key] = (raw, row)
        if self.removals is not None and lifecycle.releasable(row):
            self.removals.submit(key, row)  # after the row is written: it is the record

    async def _removed(self, key: bytes, row: SnapshotRow | None) -> None:
        """The snapshot is gone from vSphere: tell each disk (``SnapshotRemoved``, once) and
        drop the row (a tombstone in the changelog), so the table holds only the snapshots
        still on their VMs. A notice for a row already dropped is a duplicate: nothing."""
        if row is None:
            return
        if not row.removed:  # rows marked removed by earlier versions told their disks then
            for disk in row.disks.values():
                await self.send(SnapshotRemoved(
                    event_id=stable_event_id("SnapshotRemoved", disk.key, row.vm_snapshot),
                    disk=disk, vm_snapshot=row.vm_snapshot))
            log.info("snapshot removed", extra={"vm_snapshot": row.vm_snapshot,
                                                "vm": row.vm_instance_uuid})
        del self.snapshots[key]
        self._snapshot_rows.pop(key, None)

    def snapshot_row(self, key: bytes) -> SnapshotRow | None:
        """The ``snapshots`` row of ``key``, decoded (cached like :meth:`row`)."""
        raw = self.snapshots.get(key)
        cached = self._snapshot_rows.get(key)
        if cached is not None and cached[0] is raw:
            return cached[1]
        return SnapshotRow.model_validate(raw) if raw else None

    def held_snapshot_partitions(self) -> frozenset[int]:
        """The partitions of the ``snapshots`` table this worker holds as active now."""
        topic = self.snapshots.changelog_topic.get_topic_name()
        return frozenset(tp.partition for tp in self.app.assignor.assigned_actives()
                         if tp.topic == topic)

    def held_snapshot_rows(self, held: frozenset[int]) -> list[tuple[bytes, SnapshotRow]]:
        """The ``snapshots`` rows of the partitions ``held`` (:meth:`held_snapshot_partitions`:
        the memory store also keeps rows of partitions that moved away, and standby ones)."""
        out = []
        for key in list(self.snapshots.keys()):
            if self.gatherer.partition_of(key) in held:
                row = self.snapshot_row(key)
                if row is not None:
                    out.append((key, row))
        return out

    async def sweep_removals(self) -> None:
        """Task: retry the removals of held rows that are releasable and not removed, every
        ``streams.remove_sweep_interval_s`` and as soon as the partitions this worker holds
        changed (a stopped or rebalanced worker's removals, left releasable, are picked up by
        their new owner within a second or two, not a whole interval later, while the
        scheduler skips those VMs as still being copied); at the worker's stop, let removals
        already running finish for a few seconds, then cancel the rest."""
        assert self.removals is not None
        interval = self.settings.streams.remove_sweep_interval_s
        swept: frozenset[int] | None = None
        try:
            while True:
                due = time.monotonic() + interval
                while time.monotonic() < due:
                    await asyncio.sleep(min(1.0, interval))
                    if self.gatherer.ready() and self.held_snapshot_partitions() != swept:
                        break
                if not self.gatherer.ready():
                    continue
                swept = self.held_snapshot_partitions()
                rows = self.held_snapshot_rows(swept)
                started = self.removals.sweep(rows)
                if started:
                    log.info("snapshot removals retried", extra={"count": started})
                for _, row in rows:  # rows earlier versions kept after the removal: dropped
                    if row.removed:
                        disk = next(iter(row.disks.values()))
                        await self.announce(Notice(kind="removed", disk=disk,
                                                   vm_snapshot=row.vm_snapshot))
        finally:
            await self.removals.stop(grace_s=REMOVAL_GRACE_S)

    async def announce(self, notice: Notice) -> None:
        """Send a notice to the lifecycle topic (keyed by its VM snapshot)."""
        await self.lifecycle_topic.send(key=notice.key, value=notice.model_dump_json().encode())
