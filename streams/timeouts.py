"""Finding silent running syncs, so no disk waits forever behind one.

A timer of the worker looks at the running syncs of the rows it holds every
``streams.sync_check_interval_s``. For each sync silent longer than ``streams.sync_timeout_s``
(no outcome, no ``SyncProgress`` seen, measured from its plan or its last re-issue) it sends a
:class:`SyncCheck` to the internal topic ``<app id>-sync-checks``, keyed by the disk, so the
check is decided by the agent of the disk's partition like any other input: through the pure
``streams.planner.timeout_step`` (re-issue the plan, then ``SyncFailed(sync_timed_out)``), with
the row written and the outputs sent in the same order as for a snapshot or a commit. The
decision time is carried in the record, so a check redelivered after a crash decides the same
and republishes the same outputs.

The timer only proposes: a row it holds may be stale (a partition just revoked), or the copier
may have reported progress in between; the agent re-checks against the current row and the
progress it has seen.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import faust
from pydantic import AwareDatetime, BaseModel, ConfigDict

from streams.pools import running_pool

log = logging.getLogger("cbtstream.streams.timeouts")


class SyncCheck(BaseModel):
    """Check the running sync ``sync_id`` of ``disk_key`` as of ``at``."""

    model_config = ConfigDict(frozen=True)

    disk_key: str
    sync_id: uuid.UUID
    at: AwareDatetime
    last_progress: AwareDatetime | None = None


def _time(value: object) -> datetime | None:
    return datetime.fromisoformat(value) if isinstance(value, str) else None


def silent(raw: object, now: datetime, timeout: timedelta,
           progress: dict[uuid.UUID, datetime],
           pool_waited: dict[str, datetime] | None = None) -> SyncCheck | None:
    """The check to send for one table row (its JSON, as the table holds it), or None. Reads
    the few fields it needs without validating the row (every row, every interval).

    ``pool_waited``: per pool, the last time it was seen without a live copier
    (``streams.pools``). Time spent waiting for a copier is not silence, so it counts like a
    progress report: a pool's copier that comes back gets a whole time-out to report its
    plans, instead of having them all re-issued at once."""
    if not isinstance(raw, dict):
        return None
    running = raw.get("running")
    if not isinstance(running, dict):
        return None
    sync_id = uuid.UUID(str(running["sync_id"]))
    last = progress.get(sync_id)
    waited = (pool_waited or {}).get(running_pool(raw) or "")
    if waited is not None and (last is None or waited > last):
        last = waited
    since = max(t for t in (_time(running.get("planned_at")), _time(raw.get("reissued_at")),
                            last) if t is not None)
    if now - since < timeout:
        return None
    disk = running["disk"]
    return SyncCheck(disk_key=f"{disk['vm_instance_uuid']}/disk-{disk['device_key']}",
                     sync_id=sync_id, at=now, last_progress=last)


def register_sync_checks(app: faust.App, table: Any, topic: faust.TopicT,
                         progress: dict[uuid.UUID, datetime], *, timeout_s: float,
                         interval_s: float, unserved: Callable[[], set[str]],
                         pool_waited: dict[str, datetime]) -> None:
    """Start the timer in ``app`` that sends a :class:`SyncCheck` to ``topic`` for every silent
    running sync of ``table`` (the ``disks`` table; ``progress`` is the worker's memory of
    the latest ``SyncProgress`` per sync), except those of the pools ``unserved`` names (no
    live copier: they wait for their pool, ``streams.pools``); ``pool_waited`` is the survey's
    memory of when each pool last had no copier (see :func:`silent`)."""
    timeout = timedelta(seconds=timeout_s)

    @app.timer(interval=interval_s, name="cbtstream-sync-checks")  # type: ignore[untyped-decorator]
    async def sync_checks() -> None:
        if app.rebalancing:
            return
        now = datetime.now(UTC)
        sent = 0
        waiting_pools = unserved()
        for raw in list(table.values()):
            if waiting_pools and running_pool(raw) in waiting_pools:
                continue
            check = silent(raw, now, timeout, progress, pool_waited)
            if check is None:
                continue
            await topic.send(key=check.disk_key.encode(), value=check.model_dump_json().encode())
            sent += 1
        if sent:
            log.info("silent syncs found", extra={"count": sent})
