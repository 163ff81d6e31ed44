"""Copier pools as the planner sees them: which pools have a live copier, which running syncs
wait for a pool that has none, which disks sit in another pool than ``[pools]`` says, and the
operator's pool moves.

**Liveness.** Every ``streams.sync_check_interval_s`` a timer of the worker describes the
consumer group of each pool its running syncs are in (``cbtstream.kafka.copier_group_id``) and
keeps the number of members per pool (:class:`PoolView`). A running sync of a pool with no
member is *waiting for its pool*, not silent: the time-out check leaves it alone (re-issuing a
plan nobody reads, then failing it and removing its VM snapshot, would only turn a missing
copier into a recopy later), and it is counted in ``cbtstream_syncs_waiting_for_pool{pool}``
(alert ``CbtstreamPoolWithoutCopier``) and shown by ``cbtstream status``. When the broker does
not answer, membership is unknown and time-outs apply as before.

**Where a disk lives.** A disk takes its configured pool at its first plan and keeps it
(``DiskState.pool``); a later change of ``[pools]`` is reported (``cbtstream_disks_pool_
mismatch``, a warning per plan), never followed, because following it would recopy the disk
into a pool that holds nothing of it. :class:`PoolMove`, published by ``cbtstream pools move``
to the internal ``<app id>-sync-checks`` topic keyed by the disk, moves it: the disk's agent
applies ``streams.planner.move_step`` and the next plan is a full copy (``pool_moved``).

The rules here are pure; the timer is the only I/O.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import faust
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from cbtstream.config import PoolsSettings, Settings
from cbtstream.errors import CbtStreamError
from cbtstream.kafka import copier_group_id, group_members
from schemas.events import DEFAULT_POOL, POOL_NAME

log = logging.getLogger("cbtstream.streams.pools")


class PoolMove(BaseModel):
    """An operator's request: the replica of ``disk_key`` is to live in ``pool`` from its next
    plan on (a full copy there)."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["pool_move"] = "pool_move"
    disk_key: str
    pool: str = Field(pattern=POOL_NAME)
    at: AwareDatetime
    #: Who asked (the operator's login, for the log).
    requested_by: str = Field(default="", max_length=128)


def as_move(value: bytes | None) -> PoolMove | None:
    """The record of the checks topic as a :class:`PoolMove`, or None (a ``SyncCheck``)."""
    if value is None or b'"pool_move"' not in value:
        return None
    return PoolMove.model_validate_json(value)


def checks_topic(settings: Settings) -> str:
    """The worker's internal topic of time-out checks and pool moves (keyed by disk)."""
    return f"{settings.kafka.topic_prefix}{settings.streams.app_id}-sync-checks"


def running_pool(raw: object) -> str | None:
    """The pool of a table row's running sync (its JSON, unvalidated), or None."""
    if not isinstance(raw, dict):
        return None
    running = raw.get("running")
    if not isinstance(running, dict):
        return None
    pool = running.get("pool")
    return pool if isinstance(pool, str) else DEFAULT_POOL


def mismatched(raw: object, pools: PoolsSettings) -> bool:
    """Whether a table row's pool differs from the one ``[pools]`` gives its disk."""
    if not isinstance(raw, dict) or not isinstance(raw.get("pool"), str):
        return False
    disk = raw.get("disk")
    if not isinstance(disk, dict):
        return False
    key = f"{disk.get('vm_instance_uuid')}/disk-{disk.get('device_key')}"
    return bool(raw["pool"] != pools.pool_for(key))


@dataclass
class PoolView:
    """The latest survey: live copiers per pool (absent: not known), and its consequences."""

    live: dict[str, int] = field(default_factory=dict)
    waiting: Counter[str] = field(default_factory=Counter)
    mismatched: int = 0
    #: Per pool, the last survey that found it without a live copier (kept across surveys:
    #: the time-out checks count silence from it, ``streams.timeouts.silent``).
    waited: dict[str, datetime] = field(default_factory=dict)

    def unserved(self) -> set[str]:
        """Pools known to have no live copier."""
        return {pool for pool, n in self.live.items() if n == 0}


def survey(rows: Iterable[object], live: dict[str, int], pools: PoolsSettings) -> PoolView:
    """The view of the table's rows (their JSON) given the members per pool. Pure."""
    view = PoolView(live=dict(live))
    unserved = view.unserved()
    for raw in rows:
        pool = running_pool(raw)
        if pool is not None and pool in unserved:
            view.waiting[pool] += 1
        view.mismatched += mismatched(raw, pools)
    return view


def pools_in_use(rows: Iterable[object], pools: PoolsSettings) -> set[str]:
    """The pools of the rows and their running syncs, with every configured pool (their copiers
    are reported even when idle)."""
    found: set[str] = set()
    for raw in rows:
        if (pool := running_pool(raw)) is not None:
            found.add(pool)
        if isinstance(raw, dict) and isinstance(raw.get("pool"), str):
            found.add(raw["pool"])
    return found | {pools.default, *(a.pool for a in pools.assign)}


def register_pool_survey(app: faust.App, settings: Settings, table: Any, view: PoolView,
                         publish: Callable[[PoolView], Awaitable[None] | None]) -> None:
    """Start the timer that refreshes ``view`` (in place, so the time-out checks and the
    metrics read the latest) and hands it to ``publish``."""
    prefix = settings.kafka.topic_prefix

    @app.timer(interval=settings.streams.sync_check_interval_s,  # type: ignore[untyped-decorator]
               name="cbtstream-pool-survey")
    async def pool_survey() -> None:
        if app.rebalancing:
            return
        rows = list(table.values())
        names = sorted(pools_in_use(rows, settings.pools))
        try:
            members = await group_members(settings.kafka,
                                          [copier_group_id(prefix, p) for p in names])
        except CbtStreamError as exc:
            log.warning("cannot tell which pools have live copiers", extra={"error": str(exc)})
            live: dict[str, int] = {}
        else:
            live = {p: len(members[group]) for p in names
                    if (group := copier_group_id(prefix, p)) in members}
        fresh = survey(rows, live, settings.pools)
        for pool, n in fresh.waiting.items():
            if view.waiting.get(pool, 0) == 0:
                log.warning("syncs wait for a pool with no live copier", extra={
                    "pool": pool, "syncs": n, "group": copier_group_id(prefix, pool)})
        view.live, view.waiting, view.mismatched = fresh.live, fresh.waiting, fresh.mismatched
        now = datetime.now(UTC)
        for pool in fresh.unserved():
            view.waited[pool] = now
        result = publish(view)
        if result is not None:
            await result

