"""The seed-compatible HTTP API, served from the ``disks`` table by the Faust worker's own web
server (``settings.streams.web_host``/``web_port``, 127.0.0.1 by default).

Endpoints (all JSON):

``GET /api/v1/replications/changeid?vm_path=...[&disk_id=disk-<n>]``
    The seed's fixed API. 200 ``{"vm_path", "disk_id", "change_id", "message"}`` with
    ``message`` "Previous change ID found" or "No previous successful migration found". Without
    ``disk_id`` a single-disk VM answers with its disk; a multi-disk VM answers **409** with the
    list of its disk ids (it never guesses, which was the seed's bug). An unknown VM, or an
    unknown disk of a known VM, answers 200 with an empty ``change_id`` and the "No previous..."
    message, as the seed does (a first sync is not an error). A path shared by several VMs
    (a VM deleted and re-created under the same name) answers 409 with their instance uuids.
    Missing ``vm_path``: 400.
``GET /api/v1/disks/<vm uuid>/disk-<n>``
    The disk's latest row: committed change ID, ``committed_at``, replication type, running sync,
    waiting snapshot, last failure. 404 for an unknown disk. Asked of the worker that holds the
    key's partition.
``GET /api/v1/vms/<vm uuid>/disks``
    Every disk of the VM (404 if none).

With several planner workers the table is spread over them (by disk key), so a VM's disks may
live on several: the VM-wide endpoints ask every worker for its matching rows and merge them
(``streams.gather``), and answer 503 only while that cannot give the whole table (a rebalance
under way, a worker that does not answer), never from part of it.

``vm_path`` matches the path of the disk's committed identity, its running sync or its waiting
snapshot (a renamed VM is found by either name while the rename propagates). Change IDs are the
*committed* ones only: a running sync's target change ID is never reported as the previous one.

Authentication: if ``settings.api.token`` is set, every ``/api`` request needs
``Authorization: Bearer <token>`` (401 otherwise, compared in constant time, never logged). Without
a token the read endpoints above are open, which the settings allow only when the worker binds a
loopback address (``cbtstream.config.Settings``: a non-loopback ``streams.web_host`` without a
token is a configuration error), and the write endpoints refuse every call
(``streams.store_api``).

Pure logic (``changeid_answer``, ``disk_view``...) is separate from the Faust glue
(:func:`register_api`), so it is tested without a worker.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import faust

from schemas.disk import parse_disk_key
from streams.gather import Unavailable
from streams.state import DiskState

log = logging.getLogger("cbtstream.api")

FOUND = "Previous change ID found"
NOT_FOUND = "No previous successful migration found"


@dataclass(frozen=True)
class Answer:
    """An HTTP status and its JSON body."""

    status: int
    body: dict[str, Any]


def error(status: int, message: str, details: str, **extra: Any) -> Answer:
    return Answer(status, {"error": message, "details": details, **extra})


# -- pure logic ---------------------------------------------------------------------------------
def vm_paths(state: DiskState) -> set[str]:
    """Every inventory path a row knows its VM by (committed, running, waiting)."""
    paths = {state.disk.vm_path}
    if state.running is not None:
        paths.add(state.running.disk.vm_path)
    if state.waiting is not None:
        paths.add(state.waiting.disk.vm_path)
    return paths


def disks_at_path(rows: Iterable[DiskState], vm_path: str) -> dict[str, list[DiskState]]:
    """Rows of the disks whose VM is known by ``vm_path``, grouped by VM instance uuid."""
    found: dict[str, list[DiskState]] = {}
    for row in rows:
        if vm_path in vm_paths(row):
            found.setdefault(row.disk.vm_instance_uuid, []).append(row)
    for disks in found.values():
        disks.sort(key=lambda r: r.disk.device_key)
    return found


def changeid_answer(rows: Iterable[DiskState], vm_path: str | None, disk_id: str | None) -> Answer:
    """The seed's ``/api/v1/replications/changeid`` for the rows of the table."""
    if not vm_path:
        return error(400, "Missing vm_path parameter", "vm_path query parameter is required")
    vms = disks_at_path(rows, vm_path)
    if len(vms) > 1:
        return error(409, "Ambiguous vm_path",
                     f"{len(vms)} VMs are known by this path; ask by VM instance uuid",
                     vm_path=vm_path, vm_instance_uuids=sorted(vms))
    disks = next(iter(vms.values()), [])
    if not disk_id:
        if len(disks) > 1:
            return error(409, "Multi-disk VM: disk_id parameter is required",
                         "this VM has several disks, each with its own change ID",
                         vm_path=vm_path, disk_ids=[d.disk.disk_id for d in disks])
        row = disks[0] if disks else None
    else:
        row = next((d for d in disks if d.disk.disk_id == disk_id), None)
    change_id = row.change_id if row is not None and row.change_id else ""
    return Answer(200, {
        "vm_path": vm_path,
        "disk_id": row.disk.disk_id if row is not None else (disk_id or ""),
        "change_id": change_id,
        "message": FOUND if change_id else NOT_FOUND,
    })


def disk_view(state: DiskState) -> dict[str, Any]:
    """A disk's row as the API shows it (the table's bookkeeping fields left out)."""
    running = state.running
    waiting = state.waiting
    return {
        "disk_key": state.disk.key,
        "disk": state.disk.model_dump(mode="json"),
        "change_id": state.change_id,
        "committed_at": state.committed_at.isoformat() if state.committed_at else None,
        "replication_type": state.replication_type,
        "commits": state.commits,
        "commit_sync_id": str(state.commit_sync_id) if state.commit_sync_id else None,
        "running_sync": None if running is None else {
            "sync_id": str(running.sync_id),
            "vm_snapshot": running.vm_snapshot,
            "replication_type": running.replication_type,
            "previous_change_id": running.previous_change_id,
            "change_id": running.change_id,
            "planned_at": running.planned_at.isoformat(),
            # re-issued because it showed no outcome and no progress (streams.sync_timeout_s)
            "reissued": state.reissued,
        },
        "waiting_snapshot": None if waiting is None else {
            "event_id": str(waiting.event_id),
            "vm_snapshot": waiting.vm_snapshot,
            "change_id": waiting.change_id,
            "taken_at": waiting.taken_at.isoformat(),
        },
        "last_failure": state.last_failure,
    }


def authorized(header: str | None, token: str | None) -> bool:
    """Whether an ``Authorization`` header carries the bearer token (always, if no token is
    configured: the read endpoints on a loopback bind; writes check that case themselves,
    ``streams.store_api.write_refusal``). Constant-time comparison."""
    if token is None:
        return True
    if not header or not header.startswith("Bearer "):
        return False
    return hmac.compare_digest(header[len("Bearer "):].strip().encode(), token.encode())


# -- Faust glue ---------------------------------------------------------------------------------
Handler = Callable[..., Awaitable[Any]]


#: The rows matching a query, from every worker (``streams.shards``); raises
#: ``streams.gather.Unavailable`` when the whole table cannot be asked.
FindRows = Callable[[Mapping[str, str]], Awaitable[list[DiskState]]]
#: A disk's row from the worker holding it (None: no such disk).
FindRow = Callable[[str], Awaitable[DiskState | None]]


def register_api(app: faust.App, token: str | None, find_rows: FindRows, find_row: FindRow,
                 ready: Callable[[], bool]) -> None:
    """Add the API's views to the Faust web server of ``app``, answering from the ``disks``
    table through ``find_rows`` and ``find_row``; ``token``, if set, is required as a bearer
    token on every ``/api`` call; ``ready`` says whether this worker's table is recovered and
    no rebalance is under way."""

    def guarded(fun: Callable[..., Awaitable[Answer | Any]]) -> Handler:
        async def get(view: Any, request: Any, **kwargs: Any) -> Any:
            if not authorized(request.headers.get("Authorization"), token):
                return view.json({"error": "Unauthorized",
                                  "details": "Authorization: Bearer <token> required"},
                                 status=401, headers={"WWW-Authenticate": "Bearer"})
            try:
                result = await fun(view, request, **kwargs)
            except Unavailable as exc:
                result = error(503, "Table not available", str(exc))
            return view.json(result.body, status=result.status)

        get.__name__ = fun.__name__
        return get

    async def changeid(view: Any, request: Any) -> Answer:
        vm_path = request.query.get("vm_path")
        rows = await find_rows({"vm_path": vm_path}) if vm_path else []
        answer = changeid_answer(rows, vm_path, request.query.get("disk_id"))
        log.info("changeid query", extra={"vm_path": request.query.get("vm_path", "")[:300],
                                          "disk_id": request.query.get("disk_id", "")[:64],
                                          "status": answer.status})
        return answer

    async def disk(view: Any, request: Any, vm: str, disk_id: str) -> Answer:
        key = f"{vm}/{disk_id}"
        try:
            parse_disk_key(key)
        except ValueError as exc:
            return error(404, "Unknown disk", str(exc))
        state = await find_row(key)
        if state is None:
            return error(404, "Unknown disk", f"no row for disk key {key}")
        return Answer(200, disk_view(state))

    async def vm_disks(view: Any, request: Any, vm: str) -> Answer:
        found = sorted((r for r in await find_rows({"vm": vm.lower()})
                        if r.disk.vm_instance_uuid == vm.lower()),
                       key=lambda r: r.disk.device_key)
        if not found:
            return error(404, "Unknown VM", f"no disk of VM {vm[:64]} in the table")
        return Answer(200, {"vm_instance_uuid": vm.lower(),
                            "disks": [disk_view(r) for r in found]})

    async def is_ready(view: Any, request: Any) -> Any:
        """Readiness (for probes and tests): tables recovered and no rebalance in progress.
        Unauthenticated: it reveals nothing but this one bit."""
        ok = ready()
        return view.json({"ready": ok}, status=200 if ok else 503)

    app.page("/api/v1/ready", name="api_ready")(is_ready)
    app.page("/api/v1/replications/changeid", name="api_changeid")(guarded(changeid))
    app.page("/api/v1/disks/{vm}/{disk_id}", name="api_disk")(guarded(disk))
    app.page("/api/v1/vms/{vm}/disks", name="api_vm_disks")(guarded(vm_disks))
