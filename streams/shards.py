"""The questions about the whole ``disks`` table, and each worker's part of their answers.

A worker answers three kinds of part for the partitions it holds (``streams.gather`` asks every
worker and checks the parts are the whole table once):

* ``rows``: its rows matching the query (:func:`select`: a disk key, VM uuids, a VM path or a
  job id), as the table stores them;
* ``needed``: the VM snapshots its running and waiting syncs need, and whether that is the whole
  of its partitions' needs (``streams.orphans``);
* ``status``: the status of its matching disks and their summary (``streams.status``).

:class:`TableQueries` asks them for the API (``streams.api``), the store calls
(``streams.store_api``), the orphan hunt (``streams.orphans``) and ``GET /api/v1/status``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

from cbtstream.config import Settings
from schemas.events import SyncProgress
from streams.api import error, vm_paths
from streams.external import StoreRequest, known_job
from streams.gather import Gatherer, Unavailable
from streams.orphans import merge_needs, needs_part
from streams.pools import PoolView
from streams.state import DiskState, from_json, to_json
from streams.status import (
    Policy,
    StatusCache,
    matches,
    merge_summaries,
    micros,
    status_of,
    summarize,
)

#: ``copier.queue_report_interval_s`` is capped at this share of ``streams.sync_timeout_s`` (as
#: ``consumers.queued.report_interval`` does, which this role may not import).
_TIMEOUT_SHARE = 5


def silent_after_s(settings: Settings) -> float:
    """A running sync unheard of for three report intervals is silent (as ``cbtstream status
    --from-log`` counts it)."""
    interval = settings.copier.queue_report_interval_s
    timeout = settings.streams.sync_timeout_s
    if timeout > 0:
        interval = min(interval, timeout / _TIMEOUT_SHARE)
    return 3 * max(interval, settings.copier.progress_interval_s)


def select(rows: Iterable[DiskState], params: Mapping[str, str]) -> list[DiskState]:
    """The rows a ``rows`` query asks for (pure): ``disk`` (a disk key), ``vm`` (instance uuids,
    comma-separated), ``vm_path`` (any path a row knows its VM by, ``streams.api.vm_paths``) or
    ``job`` (a job id the row knows, ``streams.external.known_job``). No criterion: none."""
    disk, vm_path, job = params.get("disk"), params.get("vm_path"), params.get("job")
    vms = {v.strip().lower() for v in params["vm"].split(",")} if params.get("vm") else None
    if disk is None and vm_path is None and job is None and vms is None:
        return []
    return [r for r in rows
            if (disk is None or r.disk.key == disk)
            and (vms is None or r.disk.vm_instance_uuid in vms)
            and (vm_path is None or vm_path in vm_paths(r))
            and (job is None or known_job(r, job))]


class Local(Protocol):
    """What the parts are made of: this worker's side of the table (``streams.app.PlannerApp``)."""

    settings: Settings
    pools: PoolView
    #: The latest ``SyncProgress`` of each running sync and when it was heard.
    reports: dict[uuid.UUID, tuple[SyncProgress, datetime]]
    #: The row-only part of each row's status.
    status_cache: StatusCache

    def rows(self) -> list[DiskState]: ...

    def keyed_rows(self) -> list[tuple[str, DiskState]]: ...

    async def snapshots_processed(self) -> bool: ...


class TableQueries:
    """The whole table's answers, from every worker's part."""

    def __init__(self, gatherer: Gatherer, local: Local) -> None:
        self.gatherer = gatherer
        self.local = local
        gatherer.serve("rows", self._rows_part)
        gatherer.serve("needed", self._needed_part)
        gatherer.serve("status", self._status_part)

    # -- this worker's parts ------------------------------------------------------------------
    async def _rows_part(self, params: Mapping[str, str]) -> dict[str, Any]:
        return {"rows": [to_json(r) for r in select(self.local.rows(), params)]}

    async def _needed_part(self, params: Mapping[str, str]) -> dict[str, Any]:
        whole = await self.local.snapshots_processed()
        return needs_part(self.local.rows(), whole)

    def policy(self, params: Mapping[str, str]) -> Policy:
        s = self.local.settings
        asked = params.get("rpo_s")
        return Policy(rpo_s=float(asked or s.streams.rpo_s), override=bool(asked),
                      at_risk=s.streams.rpo_at_risk,
                      silent_after_s=silent_after_s(s),
                      unserved=frozenset(self.local.pools.unserved()),
                      live=dict(self.local.pools.live))

    async def _status_part(self, params: Mapping[str, str]) -> dict[str, Any]:
        now = datetime.fromisoformat(params["now"]) if params.get("now") else datetime.now(UTC)
        policy = self.policy(params)
        reports = self.local.reports
        vm, disk = params.get("vm") or None, params.get("disk") or None
        cache, now_us = self.local.status_cache, micros(now)
        objects, lines = [], []
        for key, r in self.local.keyed_rows():
            if matches(r, vm, disk, key):
                obj, text = status_of(cache.get(key, r),
                                      reports.get(r.running.sync_id) if r.running else None,
                                      now, policy, now_us)
                objects.append(obj)
                lines.append((obj["vm_name"], obj["vm_instance_uuid"], key, text))
        summary = summarize(objects, policy)
        if params.get("disks", "1") == "0":
            return {"summary": summary, "disks": []}
        if params.get("form") == "text":
            # each disk as its sort key and JSON text: the gathering worker splices them into
            # its answer instead of decoding and encoding them again
            return {"summary": summary, "disk_lines": lines}
        return {"summary": summary, "disks": objects}

    # -- the whole table ------------------------------------------------------------------------
    async def rows(self, params: Mapping[str, str]) -> list[DiskState]:
        """Every worker's rows matching ``params`` (:func:`select`)."""
        shards = await self.gatherer.gather("rows", params)
        found = {}
        for shard in shards:
            for raw in shard.body.get("rows") or ():
                row = from_json(raw)
                if row is not None:
                    found[row.disk.key] = row
        return list(found.values())

    async def row(self, key: str) -> DiskState | None:
        """The disk's row, from the worker holding it."""
        shard = await self.gatherer.owner("rows", key.encode(), {"disk": key})
        rows = [r for r in (from_json(raw) for raw in shard.body.get("rows") or ())
                if r is not None and r.disk.key == key]
        return rows[0] if rows else None

    async def store_rows(self, req: StoreRequest) -> list[DiskState]:
        """The rows a store call may be about (``streams.external.locate`` picks its disk):
        the disk; or the disks at its VM path; or every disk of the VMs that know its job."""
        if req.disk_key is not None:
            row = await self.row(req.disk_key)
            return [row] if row is not None else []
        if req.vm_path:
            return await self.rows({"vm_path": req.vm_path})
        vms = sorted({r.disk.vm_instance_uuid for r in await self.rows({"job": req.job_id})})
        return await self.rows({"vm": ",".join(vms)}) if vms else []

    async def needs(self) -> set[tuple[str, str]] | None:
        """What every running or waiting sync needs, or None (``streams.orphans``)."""
        return merge_needs(s.body for s in await self.gatherer.gather("needed"))

    def leads(self) -> bool:
        """Whether this worker reconciles orphans: it holds partition 0 of the table."""
        return 0 in self.gatherer.held()

    async def status(self, params: Mapping[str, str]) -> dict[str, Any]:
        """Per-disk status and the summary of the whole table (or of the disks ``vm`` or
        ``disk`` select), measured at one instant."""
        result: dict[str, Any] = json.loads(await self.status_json(params))
        return result

    async def status_json(self, params: Mapping[str, str]) -> bytes:
        """:meth:`status` as the JSON text ``GET /api/v1/status`` answers: the disks' texts
        as the workers made them (``form=text``), sorted by VM name, VM and disk, spliced
        into the answer. Decoding 15,000 objects and encoding them again cost more than
        computing them."""
        now = datetime.now(UTC)
        query = {k: v for k, v in params.items() if k in ("vm", "disk", "disks", "rpo_s")}
        shards = await self.gatherer.gather("status", {**query, "now": now.isoformat(),
                                                       "form": "text"})
        lines: list[tuple[str, str, str, str]] = []
        for s in shards:
            # a worker of an earlier version answers objects
            lines.extend((d["vm_name"], d["vm_instance_uuid"], d["disk"], json.dumps(d))
                         for d in s.body.get("disks") or ())
            lines.extend((a, b, c, d) for a, b, c, d in s.body.get("disk_lines") or ())
        lines.sort(key=lambda line: line[:3])
        head = json.dumps({
            "as_of": now.isoformat().replace("+00:00", "Z"),
            "workers": [{"url": s.url, "partitions": sorted(s.partitions)} for s in shards],
            "summary": merge_summaries(s.body["summary"] for s in shards)})
        return f'{head[:-1]},"disks":[{",".join(line[3] for line in lines)}]}}'.encode()


def register_status(app: Any, queries: TableQueries,
                    authorized: Callable[[str | None], bool]) -> None:
    """``GET /api/v1/status[?vm=UUID|NAME|PATH][&disk=KEY][&disks=0][&rpo_s=N]``: the site
    summary and each selected disk's status, from the table (``streams.status``)."""

    async def status(view: Any, request: Any) -> Any:
        if not authorized(request.headers.get("Authorization")):
            return view.json({"error": "Unauthorized",
                              "details": "Authorization: Bearer <token> required"},
                             status=401, headers={"WWW-Authenticate": "Bearer"})
        try:
            rpo = request.query.get("rpo_s")
            if rpo is not None and not float(rpo) > 0:
                raise ValueError(rpo)
        except ValueError:
            answer = error(400, "Invalid rpo_s", "rpo_s must be a positive number of seconds")
            return view.json(answer.body, status=answer.status)
        try:
            return view.bytes(await queries.status_json(dict(request.query)),
                              content_type="application/json")
        except Unavailable as exc:
            answer = error(503, "Table not available", str(exc))
            return view.json(answer.body, status=answer.status)

    app.page("/api/v1/status", name="api_status")(status)
