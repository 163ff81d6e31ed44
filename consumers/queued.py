"""Waiting is not silence: the ``SyncProgress(state="queued")`` reports of the plans a copier
holds but has not started.

The planner ends a sync that stays silent for ``streams.sync_timeout_s`` (re-issued once, then
``SyncFailed(sync_timed_out)``), and then the lifecycle may remove the VM snapshot the plan
needs. A plan waiting in a copier for a slot, or behind the same disk's previous plan, is not
lost: the copier says so every :func:`report_interval` seconds, with its place in the queue, so
the planner's clock measures the silence of the copier that holds the plan, not the time since
planning. Plans the copier has not fetched (``copier.max_waiting_per_partition``) are not
reported: nobody holds them.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable

from cbtstream.config import Settings
from schemas.events import SyncPlanned, SyncProgress

#: The share of ``streams.sync_timeout_s`` a report interval may take at most: four reports can
#: be lost or late before the planner calls the sync silent.
_TIMEOUT_SHARE = 5


def report_interval(settings: Settings) -> float:
    """Seconds between two queued reports of a plan: ``copier.queue_report_interval_s``, and at
    most a fifth of ``streams.sync_timeout_s`` (when the time-out is on)."""
    interval = settings.copier.queue_report_interval_s
    timeout = settings.streams.sync_timeout_s
    return min(interval, timeout / _TIMEOUT_SHARE) if timeout > 0 else interval


def queued_reports(waiting: Iterable[SyncPlanned], active: Iterable[SyncPlanned]
                   ) -> list[SyncProgress]:
    """One queued report per waiting plan, numbered in start order (1: next). A plan delivered
    twice (a re-issue) is reported once, and not at all while the same sync is running: its
    running reports speak for it."""
    seen: set[uuid.UUID] = {plan.sync_id for plan in active}
    out: list[SyncProgress] = []
    for plan in waiting:
        if plan.sync_id in seen:
            continue
        seen.add(plan.sync_id)
        out.append(SyncProgress(disk=plan.disk, sync_id=plan.sync_id, bytes_done=0,
                                bytes_total=0, rate_bytes_per_s=0.0, state="queued",
                                queue_position=len(out) + 1))
    return out
