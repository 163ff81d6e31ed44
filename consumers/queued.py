"""Waiting is not silence: the ``SyncProgress(state="queued")`` reports of the plans a copier
holds but has not started.

The planner ends a sync that stays silent for ``streams.sync_timeout_s`` (re-issued once, then
``SyncFailed(sync_timed_out)``), and then the lifecycle may remove the VM snapshot the plan
needs. A plan waiting in a copier for a slot, or behind the same disk's previous plan, is not
lost: the copier says so every :func:`report_interval` seconds, with its place in the queue, so
the planner's clock measures the silence of the copier that holds the plan, not the time since
planning. Plans the copier has not fetched (``copier.max_waiting_per_partition``) are not
reported: nobody holds them.

Each report says why the plan waits (``SyncProgress.wait_reason``): a copy slot, the disk's
previous plan, or a source limit. A copy is a VDDK/NFC session on the ESXi host that runs the
VM and reads one datastore, so a copier runs at most ``copier.max_copies_per_esxi_host`` copies
of one host's VMs and ``copier.max_copies_per_datastore`` of one datastore's disks at once
(:func:`sources`, the schedule's resources); a plan held back by one reads ``esxi host X at its
limit of N``.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable

from cbtstream.config import CopierSettings, Settings
from consumers.schedule import Resource, WaitsFor
from schemas.disk import MAX_TEXT, datastore_of
from schemas.events import SyncPlanned, SyncProgress

#: The resource kinds of a copy's sources (schedule resources; they appear in wait reasons).
ESXI_HOST = "esxi host"
DATASTORE = "datastore"

#: The share of ``streams.sync_timeout_s`` a report interval may take at most: four reports can
#: be lost or late before the planner calls the sync silent.
_TIMEOUT_SHARE = 5


def report_interval(settings: Settings) -> float:
    """Seconds between two queued reports of a plan: ``copier.queue_report_interval_s``, and at
    most a fifth of ``streams.sync_timeout_s`` (when the time-out is on)."""
    interval = settings.copier.queue_report_interval_s
    timeout = settings.streams.sync_timeout_s
    return min(interval, timeout / _TIMEOUT_SHARE) if timeout > 0 else interval


def source_limits(settings: CopierSettings) -> dict[str, int]:
    """The schedule's limits per resource kind (0: none)."""
    return {ESXI_HOST: settings.max_copies_per_esxi_host,
            DATASTORE: settings.max_copies_per_datastore}


def sources(plan: SyncPlanned) -> tuple[Resource, ...]:
    """What a copy of ``plan`` holds while it runs: its ESXi host (when the plan names it:
    plans made before ``esxi_host`` existed are limited by datastore only) and the datastore of
    its disk. Host names are compared without case, as DNS names are."""
    out: list[Resource] = []
    if plan.esxi_host:
        out.append((ESXI_HOST, plan.esxi_host.lower()))
    if (ds := datastore_of(plan.disk.backing_file)) is not None:
        out.append((DATASTORE, ds))
    return tuple(out)


def wait_reason(waits: WaitsFor) -> str:
    """The words of a queued report for what a plan waits for."""
    if waits.what == "key":
        return "the disk's previous plan"
    if waits.what == "slot":
        return f"a copy slot (copier at its limit of {waits.limit})"
    return f"{waits.what} {waits.name} at its limit of {waits.limit}"[:MAX_TEXT]


def queued_reports(waiting: Iterable[tuple[SyncPlanned, WaitsFor]],
                   active: Iterable[SyncPlanned]) -> list[SyncProgress]:
    """One queued report per waiting plan, numbered in arrival order (1: next, unless a source
    limit holds it back while others pass), with what it waits for. A plan delivered twice (a
    re-issue) is reported once, and not at all while the same sync is running: its running
    reports speak for it."""
    seen: set[uuid.UUID] = {plan.sync_id for plan in active}
    out: list[SyncProgress] = []
    for plan, waits in waiting:
        if plan.sync_id in seen:
            continue
        seen.add(plan.sync_id)
        out.append(SyncProgress(disk=plan.disk, sync_id=plan.sync_id, bytes_done=0,
                                bytes_total=0, rate_bytes_per_s=0.0, state="queued",
                                queue_position=len(out) + 1, wait_reason=wait_reason(waits)))
    return out
