"""Prometheus metrics of the Faust planner worker, served at ``/metrics`` by its web server.

:func:`register_metrics` is called once by ``Planner.__init__``. It records at the edge, through
a Faust sensor (Faust's own extension point for instrumentation), so the planner and the agents
stay free of metrics code:

* every ``SyncPlanned`` the worker sends (its ``replication_type`` and ``reason``, read from the
  record) -> ``cbtstream_syncs_planned_total`` and, for a full
  copy where a previous commit existed (epoch changed, capacity changed...),
  ``cbtstream_fallbacks_total{stage="planner"}``;
* every record it sends to the dead letter topic -> ``cbtstream_dead_letters_total``;
* at scrape time, the lag of each partition the worker consumes (end offset minus committed
  offset, both from Faust's monitor) -> ``cbtstream_consumer_lag``.

Metric names and labels are defined in :mod:`cbtstream.metrics`.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

import faust

from cbtstream.metrics import CONTENT_TYPE, Metrics
from schemas.events import FullReason, ReplicationType
from schemas.topics import DEADLETTER, SYNC_PLANNED

if TYPE_CHECKING:
    from streams.app import Planner

log = logging.getLogger("cbtstream.streams.metrics")


class _PlannerSensor(faust.Sensor):
    """Sees each message the worker sends; never lets a metrics error disturb a send."""

    #: mode logs a service's start/stop at INFO on this logger: keep it with Faust's (WARNING).
    logger = logging.getLogger("faust.sensors.cbtstream")

    def __init__(self, metrics: Metrics, planned_topic: str, deadletter_topic: str,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.metrics = metrics
        self._planned = planned_topic
        self._deadletter = deadletter_topic

    def on_send_initiated(self, producer: Any, topic: str, message: Any, keysize: int,
                          valsize: int) -> Any:
        try:
            if topic == self._planned:
                # Our own record, just encoded from a validated SyncPlanned: read the two
                # fields the metrics need instead of validating it all again (hot path).
                fields = json.loads(message.value)
                if fields.get("event_type") == "SyncPlanned":
                    self.metrics.observe_plan_fields(ReplicationType(fields["replication_type"]),
                                                     FullReason(fields["reason"]))
            elif topic == self._deadletter:
                self.metrics.observe_dead_letter("planner")
        except Exception:
            log.debug("metrics: cannot classify a sent message", exc_info=True)
        return None


def worker_lag(app: faust.App) -> dict[tuple[str, int], int]:
    """End offset minus committed offset per partition, from Faust's monitor."""
    monitor = app.monitor
    committed = monitor.tp_committed_offsets
    return {(tp.topic, tp.partition): end - committed.get(tp, 0)
            for tp, end in monitor.tp_end_offsets.items()}


def register_metrics(planner: Planner) -> Metrics:
    """Instrument the planner's app and add the ``/metrics`` page; returns the metrics."""
    prefix = planner.settings.kafka.topic_prefix
    metrics = Metrics()
    app = planner.app
    app.sensors.add(_PlannerSensor(metrics, SYNC_PLANNED.full_name(prefix),
                                   DEADLETTER.full_name(prefix)))

    async def metrics_page(view: Any, request: Any) -> Any:
        metrics.set_lag(app.conf.id, worker_lag(app))
        return view.bytes(metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    app.page("/metrics", name="metrics")(metrics_page)
    return metrics
