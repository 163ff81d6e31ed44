"""Snapshot a list of VMs on an interval.

Each tick snapshots every VM in turn; a failure on one VM is logged and does not stop the others
(the next tick tries again). Ticks are on a fixed grid (start + k * interval): a slow tick
delays the next one, it never runs two at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Callable, Sequence

from cbtstream.errors import CbtStreamError
from cbtstream.vsphere.adapter import VmRef, VSphereClient
from producers.snapshot import EventPublisher, snapshot_and_publish
from schemas.events import SnapshotTaken

log = logging.getLogger(__name__)

_INTERVAL_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_interval(text: str) -> float:
    """``"15m"`` -> 900.0; units s, m, h, d (none: seconds). Raises ``ValueError``."""
    m = _INTERVAL_RE.match(text)
    if m is None or float(m[1]) <= 0:
        raise ValueError(f"not an interval (e.g. 30s, 15m, 1h): {text!r}")
    return float(m[1]) * _UNIT_S[m[2]]


async def run_schedule(
    client: VSphereClient,
    publisher: EventPublisher,
    vms: Sequence[VmRef | str],
    every_s: float,
    *,
    stop: asyncio.Event | None = None,
    ticks: int | None = None,
    on_events: Callable[[list[SnapshotTaken]], None] | None = None,
    enable_cbt: bool = False,
) -> int:
    """Run until ``stop`` is set (or ``ticks`` ticks ran); returns the number of failed VM
    snapshots."""
    stop = stop or asyncio.Event()
    failures, tick = 0, 0
    start = time.monotonic()
    while not stop.is_set() and (ticks is None or tick < ticks):
        for vm in vms:
            try:
                events = await snapshot_and_publish(client, publisher, vm, enable_cbt=enable_cbt)
            except CbtStreamError as exc:
                failures += 1
                log.error("snapshot failed", extra={"vm": str(vm), "reason": exc.reason,
                                                    "error": str(exc)})
                continue
            if on_events is not None:
                on_events(events)
        tick += 1
        if ticks is not None and tick >= ticks:
            break
        delay = max(0.0, start + tick * every_s - time.monotonic())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
    return failures
