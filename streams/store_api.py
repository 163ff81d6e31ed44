"""The change-ID write API, for external copiers (the seed's migratekit forks), on the worker's
web server next to the read API (``streams.api``):

``POST /api/v1/replications/{job_id}/changeid``
    The seed's store call. Body ``{"change_id", "disk_id", "previous_change_id"}`` (plus
    optional ``vm_path``, also accepted as ``?vm_path=``, and ``replication_type``); answers the
    seed's ``{"job_id", "disk_id", "change_id", "message": "ChangeID stored successfully"}``
    (with ``disk_key`` and ``commit_event_id``), or the seed's error shape
    ``{"error", "details"}``: 400 bad body, 404 unknown VM or disk, 409 multi-disk VM without
    ``disk_id`` (with ``disk_ids``), stale ``previous_change_id`` or broken lineage (with
    ``current_change_id``), a disk cbtstream syncs or was handed over to it.
``POST /api/v1/disks/{vm uuid}/disk-{key}/commits``
    The per-disk variant (``schemas.api.DiskCommitRequest``), same checks and answers.

The rules are :mod:`streams.external` (pure). An accepted call is published as a
``ChangeIdCommitted`` (``origin: external``) to ``cbt.changeid.committed``; the answer waits until
the table applied it (the commit agent re-checks it: the table, not this handler, is the
authority), 202 if that takes longer than :data:`APPLY_WAIT_S`. The same call again finds it
applied and answers the same without publishing.

With several planner workers any of them takes the call: it finds the disk through the rows of
every worker (``streams.gather``: the VM's disks may live on several), publishes the commit keyed
by the disk (so the agent of the disk's partition decides it, wherever it runs), and waits for
that row on the worker holding it. 503 while the whole table cannot be asked (a rebalance).

Authentication: a write always needs the API token. An accepted store call makes the disk the
external copier's, and cbtstream stops planning it, so an unauthenticated write must never run:
with no ``api.token`` configured every store call answers **403** saying how to configure one;
with a token, a call without it (or with another) answers 401. Nothing is published either way.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from faust.web import View
from pydantic import ValidationError

from schemas.api import DiskCommitRequest, StoreChangeIdRequest
from schemas.disk import parse_disk_key
from schemas.events import ChangeIdCommitted, utcnow
from streams.api import Answer, error
from streams.external import Ownership, StoreRequest, check_external, store
from streams.gather import Unavailable
from streams.guard import Verdict
from streams.state import DiskState

log = logging.getLogger("cbtstream.api")

#: How long a store call waits for the table to apply its commit before answering 202.
APPLY_WAIT_S = 10.0
#: Largest request body read (a store call is a few hundred bytes).
MAX_BODY = 64 * 1024


def write_refusal(header: str | None, authorized: Callable[[str | None], bool]
                  ) -> Answer | None:
    """Why a store call may not run (403 or 401), or None if it may. ``authorized`` is the
    worker's token check; if it lets a request without credentials through, no token is
    configured and nobody can be authenticated, so every write is refused (403)."""
    if authorized(None):
        return error(403, "Writes need an API token",
                     "this worker has no api.token, so it refuses every store call; set one "
                     "on the worker (CBTSTREAM_API__TOKEN=$(openssl rand -hex 32), or token / "
                     "token_file in the [api] table of the config file), restart it, and send "
                     "Authorization: Bearer <token>")
    if not authorized(header):
        return error(401, "Unauthorized", "Authorization: Bearer <token> required")
    return None


def parse_store(job_id: str, body: bytes, query_vm_path: str | None, client: str | None
                ) -> StoreRequest | Answer:
    """The seed's body as a :class:`StoreRequest` (400 for anything malformed)."""
    try:
        req = StoreChangeIdRequest.model_validate_json(body or b"{}")
    except ValidationError as exc:
        return error(400, "Invalid request body", _firsterror(exc))
    if not job_id or len(job_id) > 256:
        return error(400, "Missing job_id parameter", "job_id path parameter is required")
    return StoreRequest(job_id=job_id, change_id=req.change_id,
                        previous_change_id=req.previous_change_id,
                        replication_type=req.replication_type, disk_id=req.disk_id,
                        vm_path=req.vm_path or query_vm_path or None, client=client)


def parse_disk_commit(vm: str, disk_id: str, body: bytes, client: str | None
                      ) -> StoreRequest | Answer:
    key = f"{vm.lower()}/{disk_id}"
    try:
        parse_disk_key(key)
        req = DiskCommitRequest.model_validate_json(body or b"{}")
    except ValidationError as exc:
        return error(400, "Invalid request body", _firsterror(exc))
    except ValueError as exc:
        return error(404, "Disk not found", str(exc))
    return StoreRequest(job_id=req.job_id, change_id=req.change_id,
                        previous_change_id=req.previous_change_id,
                        replication_type=req.replication_type, disk_key=key, client=client,
                        bytes_copied=req.bytes_copied)


def _firsterror(exc: ValidationError) -> str:
    e = exc.errors()[0]
    where = ".".join(str(p) for p in e.get("loc", ())) or "body"
    return f"{where}: {e.get('msg', 'invalid')}"[:500]


class StoreService:
    """Runs store calls against the table and waits for the table to apply them."""

    def __init__(self, rows: Callable[[StoreRequest], Awaitable[list[DiskState]]],
                 row: Callable[[str], Awaitable[DiskState | None]],
                 send: Callable[[ChangeIdCommitted], Awaitable[None]],
                 ownership: Ownership, *, wait_s: float = APPLY_WAIT_S) -> None:
        """``rows(req)``: the rows a call may be about (at least those :func:`store` needs to
        find its disk: the disk, the VMs at its path or of its job, whole); ``row(key)``: the
        disk's row from the worker holding it."""
        self._rows, self._row, self._send = rows, row, send
        self.ownership = ownership
        self.wait_s = wait_s

    async def store(self, req: StoreRequest) -> Answer:
        answer, ev = store(await self._rows(req), req, utcnow(), self.ownership)
        log.info("changeid store", extra={"job_id": req.job_id[:64], "status": answer.status,
                                          "disk_id": (req.disk_id or req.disk_key or "")[:80]})
        if ev is None:
            return answer
        await self._send(ev)
        deadline = time.monotonic() + self.wait_s
        while time.monotonic() < deadline:
            row = await self._row(ev.disk.key)
            if row is not None and row.commit_event_id == ev.event_id:
                return answer
            verdict = check_external(row, ev, self.ownership)
            if verdict.verdict == Verdict.REFUSE:  # another commit got there first
                return Answer(409, {"error": "Change ID not stored", "details": verdict.detail,
                                    "current_change_id": (row.change_id if row else "") or ""})
            await asyncio.sleep(0.05)
        body = dict(answer.body, message="ChangeID accepted; the table has not applied it yet")
        return Answer(202, body)


def register_store_api(app: Any, service: StoreService, *,
                       authorized: Callable[[str | None], bool]) -> None:
    """Add the POST endpoints to the worker's Faust web server."""

    async def respond(view: Any, request: Any, make: Callable[[bytes, str | None],
                                                                StoreRequest | Answer]) -> Any:
        refused = write_refusal(request.headers.get("Authorization"), authorized)
        if refused is not None:
            challenge = {"WWW-Authenticate": "Bearer"} if refused.status == 401 else {}
            return view.json(refused.body, status=refused.status, headers=challenge)
        body = await request.content.read(MAX_BODY + 1)
        if len(body) > MAX_BODY:
            return view.json(error(413, "Request body too large", f"at most {MAX_BODY} bytes"
                                    ).body, status=413)
        peer = request.remote if isinstance(getattr(request, "remote", None), str) else None
        made = make(body, peer)
        try:
            answer = made if isinstance(made, Answer) else await service.store(made)
        except Unavailable as exc:
            answer = error(503, "Table not available", str(exc))
        return view.json(answer.body, status=answer.status)

    async def store_changeid(self: Any, request: Any, job_id: str) -> Any:
        return await respond(self, request, lambda body, peer: parse_store(
            job_id, body, request.query.get("vm_path"), peer))

    async def disk_commit(self: Any, request: Any, vm: str, disk_id: str) -> Any:
        return await respond(self, request,
                             lambda body, peer: parse_disk_commit(vm, disk_id, body, peer))

    app.page("/api/v1/replications/{job_id}/changeid", name="api_store_changeid")(
        type("StoreChangeId", (View,), {"post": store_changeid}))
    app.page("/api/v1/disks/{vm}/{disk_id}/commits", name="api_disk_commits")(
        type("DiskCommits", (View,), {"post": disk_commit}))
