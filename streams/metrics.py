"""Prometheus metrics of the Faust planner worker, served at ``/metrics`` by its web server.

:func:`register_metrics` is called once by ``streams.app.build`` with the Faust app; the app
reports each planner step to the returned :class:`PlannerMetrics` (one call per step, after its
outputs are handed to the producer), so the pure planner stays free of metrics code:

* every new ``SyncPlanned`` (its ``replication_type`` and ``reason``) ->
  ``cbtstream_syncs_planned_total`` and, for a full copy where a previous commit existed,
  ``cbtstream_fallbacks_total{stage="planner"}``; plans republished after a redelivery or
  re-issued are not counted again;
* every step by input and kind (``applied``, ``redelivered``, ``duplicate``, ``refused``,
  ``ignored``, ``reissued``, ``timed_out``) -> ``cbtstream_planner_steps_total{input,kind}``;
* running syncs ended because they showed no outcome and no progress ->
  ``cbtstream_syncs_timed_out_total``; re-issued first -> ``cbtstream_syncs_reissued_total``;
* every ``SyncFailed`` the planner decides itself (``sync_timed_out``, ``lineage_mismatch``)
  -> ``cbtstream_syncs_total{outcome="failed"}``, the copier's series of the same name, so the
  failures of every reason add up across both (the copier never publishes these reasons);
* source records skipped (an offset jump within a partition: never expected) ->
  ``cbtstream_source_records_skipped_total{topic}``;
* every action of the partition watchdog -> ``cbtstream_watchdog_actions_total{topic}``;
* every record sent to the dead letter topic -> ``cbtstream_dead_letters_total``;
* at scrape time, the lag of each partition the worker consumes (end offset minus committed
  offset, both from Faust's monitor) -> ``cbtstream_consumer_lag``;
* at scrape time, from the rows of the ``disks`` table in this worker's active partitions
  (:meth:`PlannerMetrics.observe_rows`): disks by state -> ``cbtstream_disks{state}``; each
  disk's last commit -> ``cbtstream_disk_last_commit_timestamp_seconds{disk_key}`` (the
  copier's series of the same name, kept by the table: it survives a copier restart and covers
  external commits) and its VM -> ``cbtstream_disk_info{disk_key,vm_instance_uuid,vm_name}``
  (value 1, to join on ``disk_key``); the oldest VM snapshot a running or waiting sync needs ->
  ``cbtstream_snapshot_oldest_age_seconds``. Left as they were while the worker rebalances or
  recovers its tables (a partial table would make disks vanish for a scrape);
* every orphan reconcile (``streams.orphan_interval_s``) ->
  ``cbtstream_orphan_reconciles_total{result}`` (``done``, ``failed``, ``skipped``) and, when
  done, the orphans it found and removed -> ``cbtstream_orphan_snapshots``.

Shared metric names and labels are defined in :mod:`cbtstream.metrics`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any, cast

import faust
from prometheus_client import Counter, Gauge

from cbtstream.metrics import CONTENT_TYPE, Metrics
from schemas.events import SyncFailed, SyncPlanned
from streams.pools import PoolView
from streams.state import DiskState

log = logging.getLogger("cbtstream.streams.metrics")

#: Step kinds whose plans are new decisions (a redelivery or re-issue republishes an old one).
_NEW_PLANS = frozenset({"applied", "refused", "timed_out"})

#: ``cbtstream_disks{state}``: the states of ``cbtstream status`` the table knows (``skipped``
#: comes from ``DiskSkipped``, which the table does not keep).
DISK_STATES = ("running", "failed", "synced", "new")
#: ``cbtstream_orphan_reconciles_total{result}``.
RECONCILE_RESULTS = ("done", "failed", "skipped")


def disk_state(row: DiskState) -> str:
    """``running`` (a sync in flight), ``failed`` (the last sync failed), ``synced`` (a change
    ID committed) or ``new`` (nothing committed yet)."""
    if row.running is not None:
        return "running"
    if row.last_failure is not None:
        return "failed"
    return "synced" if row.change_id is not None else "new"


def row_partition(row: DiskState) -> int | None:
    """The partition of a row, from the inputs it recorded (``<topic>#<partition>``: every topic
    has the same partitions, keyed by disk); None if it recorded none."""
    for source in row.read:
        _, _, partition = source.rpartition("#")
        if partition.isdigit():
            return int(partition)
    return None


class PlannerMetrics:
    """The worker's metrics: the shared :class:`Metrics` plus the planner's own counters."""

    def __init__(self) -> None:
        self.metrics = Metrics()
        r = self.metrics.registry
        self.steps = Counter("cbtstream_planner_steps", "Planner steps by input and kind.",
                             ["input", "kind"], registry=r)
        self.timed_out = Counter("cbtstream_syncs_timed_out", "Running syncs ended as "
                                 "SyncFailed(sync_timed_out): no outcome, no progress.",
                                 registry=r)
        self.reissued = Counter("cbtstream_syncs_reissued", "Silent running syncs whose plan "
                                "was published again (same sync id).", registry=r)
        self.skipped = Counter("cbtstream_source_records_skipped", "Source records the worker "
                               "saw skipped (an offset jump within its partition).", ["topic"],
                               registry=r)
        self.watchdog = Counter("cbtstream_watchdog_actions", "Stalled source partitions the "
                                "watchdog re-read from their committed offset.", ["topic"],
                                registry=r)
        self.disks = Gauge("cbtstream_disks", "Disks of this worker's partitions by state: "
                           "running, failed (the last sync failed), synced, new (nothing "
                           "committed yet).", ["state"], registry=r)
        self.disk_info = Gauge("cbtstream_disk_info", "Each disk of this worker's partitions "
                               "(value 1) and its VM, to join on disk_key.",
                               ["disk_key", "vm_instance_uuid", "vm_name"], registry=r)
        self.snapshot_age = Gauge("cbtstream_snapshot_oldest_age_seconds", "Age of the oldest "
                                  "VM snapshot a running or waiting sync of this worker's disks "
                                  "needs (0: none).", registry=r)
        self.orphans = Gauge("cbtstream_orphan_snapshots", "Orphaned cbtstream snapshots the "
                             "latest orphan reconcile found (and removed).", registry=r)
        self.reconciles = Counter("cbtstream_orphan_reconciles", "Orphan reconciles by result: "
                                  "done, failed, skipped (the worker does not hold the whole "
                                  "table).", ["result"], registry=r)
        self.pool_copiers = Gauge("cbtstream_pool_copiers", "Live copiers (consumer group "
                                  "members) of each pool the worker's running syncs or [pools] "
                                  "name.", ["pool"], registry=r)
        self.waiting_for_pool = Gauge("cbtstream_syncs_waiting_for_pool", "Running syncs of "
                                      "this worker's disks whose pool has no live copier (they "
                                      "wait; no time-out applies).", ["pool"], registry=r)
        self.pool_mismatch = Gauge("cbtstream_disks_pool_mismatch", "Disks whose pool differs "
                                   "from the one [pools] gives them (they stay where their "
                                   "replica is: cbtstream pools move).", registry=r)
        for state in DISK_STATES:
            self.disks.labels(state)
        for result in RECONCILE_RESULTS:
            self.reconciles.labels(result)
        #: The rows of this worker's ``disks`` table (``PlannerApp.rows``), set by ``build``.
        self.rows: Callable[[], list[DiskState]] | None = None

    def observe_step(self, source: str, kind: str, outputs: list[Any]) -> None:
        self.steps.labels(source, kind).inc()
        if kind == "timed_out":
            self.timed_out.inc()
        elif kind == "reissued":
            self.reissued.inc()
        if kind in _NEW_PLANS:
            for o in outputs:
                if isinstance(o, SyncPlanned):
                    self.metrics.observe_plan(o)
                elif isinstance(o, SyncFailed):
                    self.metrics.observe_outcome(o)

    def observe_skipped(self, topic: str, count: int) -> None:
        self.skipped.labels(topic).inc(count)

    def observe_watchdog(self, topic: str) -> None:
        self.watchdog.labels(topic).inc()

    def observe_dead_letter(self) -> None:
        self.metrics.observe_dead_letter("planner")

    def observe_reconcile(self, result: str, orphans: int | None = None) -> None:
        """An orphan reconcile ended: ``done`` (with the orphans it found), ``failed`` or
        ``skipped``."""
        self.reconciles.labels(result).inc()
        if orphans is not None:
            self.orphans.set(orphans)

    def observe_pools(self, view: PoolView) -> None:
        """The latest pool survey (``streams.pools``)."""
        self.pool_copiers.clear()
        for pool, n in view.live.items():
            self.pool_copiers.labels(pool).set(n)
        self.waiting_for_pool.clear()
        for pool in view.live:
            self.waiting_for_pool.labels(pool).set(view.waiting.get(pool, 0))
        self.pool_mismatch.set(view.mismatched)

    def observe_rows(self, rows: Iterable[DiskState], now: datetime) -> None:
        """Replace the table's series with those of ``rows`` (see the module docstring)."""
        counts = dict.fromkeys(DISK_STATES, 0)
        oldest: datetime | None = None
        self.disk_info.clear()
        self.metrics.last_commit.clear()
        for row in rows:
            counts[disk_state(row)] += 1
            d = row.disk
            self.disk_info.labels(d.key, d.vm_instance_uuid, d.vm_name).set(1)
            if row.committed_at is not None:
                self.metrics.last_commit.labels(d.key).set(row.committed_at.timestamp())
            for snap in (row.running, row.waiting):
                if snap is not None and (oldest is None or snap.taken_at < oldest):
                    oldest = snap.taken_at
        for state, n in counts.items():
            self.disks.labels(state).set(n)
        self.snapshot_age.set(0.0 if oldest is None
                              else max(0.0, (now - oldest).total_seconds()))

    def refresh_rows(self, app: faust.App) -> None:
        """:meth:`observe_rows` for the rows of the partitions ``app`` holds as active (a
        standby's rows are another worker's), unless it is rebalancing or recovering."""
        if (self.rows is None or app.rebalancing
                or not cast(Any, app.tables).recovery.completed.is_set()):
            return
        held: set[int | None] = {tp.partition for tp in app.assignor.assigned_actives()}
        held.add(None)  # a row that recorded no input: keep it rather than lose it
        self.observe_rows((r for r in self.rows() if row_partition(r) in held),
                          datetime.now(UTC))


def worker_lag(app: faust.App) -> dict[tuple[str, int], int]:
    """End offset minus committed offset per partition, from Faust's monitor."""
    monitor = app.monitor
    committed = monitor.tp_committed_offsets
    return {(tp.topic, tp.partition): end - committed.get(tp, 0)
            for tp, end in monitor.tp_end_offsets.items()}


def register_metrics(app: faust.App) -> PlannerMetrics:
    """Add the ``/metrics`` page to ``app``; returns the metrics the app reports to."""
    metrics = PlannerMetrics()

    async def metrics_page(view: Any, request: Any) -> Any:
        metrics.metrics.set_lag(app.conf.id, worker_lag(app))
        metrics.refresh_rows(app)
        return view.bytes(metrics.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    app.page("/metrics", name="metrics")(metrics_page)
    return metrics
