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
* source records skipped (an offset jump within a partition: never expected) ->
  ``cbtstream_source_records_skipped_total{topic}``;
* every action of the partition watchdog -> ``cbtstream_watchdog_actions_total{topic}``;
* every record sent to the dead letter topic -> ``cbtstream_dead_letters_total``;
* at scrape time, the lag of each partition the worker consumes (end offset minus committed
  offset, both from Faust's monitor) -> ``cbtstream_consumer_lag``.

Shared metric names and labels are defined in :mod:`cbtstream.metrics`.
"""

from __future__ import annotations

import logging
from typing import Any

import faust
from prometheus_client import Counter

from cbtstream.metrics import CONTENT_TYPE, Metrics
from schemas.events import SyncPlanned

log = logging.getLogger("cbtstream.streams.metrics")

#: Step kinds whose plans are new decisions (a redelivery or re-issue republishes an old one).
_NEW_PLANS = frozenset({"applied", "refused", "timed_out"})


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

    def observe_skipped(self, topic: str, count: int) -> None:
        self.skipped.labels(topic).inc(count)

    def observe_watchdog(self, topic: str) -> None:
        self.watchdog.labels(topic).inc()

    def observe_dead_letter(self) -> None:
        self.metrics.observe_dead_letter("planner")


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
        return view.bytes(metrics.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    app.page("/metrics", name="metrics")(metrics_page)
    return metrics
