"""Answers that need the whole ``disks`` table, whatever the number of planner workers.

The table is partitioned by disk key, so a VM's disks may live on several workers. A VM-wide
question (which disks does the VM at this path have? which snapshots do syncs need? how is the
site?) is asked of every worker and the answers are merged (scatter-gather). Each worker
answers for its own partitions only, on an internal endpoint, ``GET
/api/v1/internal/shard/<kind>`` (the API token guards it like every ``/api`` call), with the
partitions it answered for and whether its table is ready (recovered, no rebalance).

**Whole, or 503.** The workers to ask come from Faust's router (the assignor's map of which
worker's web URL holds which table partitions), but the merge trusts only what the workers say
of themselves: the partitions of the answers must cover every partition of the table exactly
once, and every answer must come from a ready table (:func:`coverage`). Anything else (a
rebalance under way, a worker that does not answer within :data:`ASK_TIMEOUT_S`, two workers
claiming one partition while the assignment moves) raises :class:`Unavailable`, which the
endpoints answer as 503: never an answer from part of the table.

**Only the owner's rows.** Faust's in-memory store keeps the rows an agent wrote in a partition
after the partition moved to another worker (it forgets only rows it recovered from the
changelog). So a worker answers from the rows whose key falls in the partitions it holds now
(``cbtstream.kafka.key_partition``), never from such leftovers.

One owner per decision: a question about one disk goes to the worker holding the disk's
partition (:meth:`Gatherer.owner`); writes are not routed at all: a store call publishes its
commit keyed by disk, and the disk's agent decides it, as for any commit.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from yarl import URL

from cbtstream.errors import CbtStreamError
from cbtstream.kafka import key_partition

log = logging.getLogger("cbtstream.api")

#: How long a worker may take to answer its part (a status part of 7,500 disks takes ~0.3 s).
ASK_TIMEOUT_S = 10.0
SHARD_PATH = "/api/v1/internal/shard/{kind}"

#: A worker's own part of an answer (``params`` are the request's query parameters).
LocalShard = Callable[[Mapping[str, str]], Awaitable[dict[str, Any]]]


class Unavailable(CbtStreamError):
    """The whole table cannot be asked right now (answered as 503)."""

    retriable = True


@dataclass(frozen=True)
class Shard:
    """One worker's part of an answer."""

    url: str
    partitions: frozenset[int]
    ready: bool
    body: Mapping[str, Any]


def coverage(shards: Iterable[Shard], partitions: int) -> str | None:
    """Why ``shards`` are not the whole table exactly once (None: they are). Pure."""
    seen: dict[int, str] = {}
    for s in shards:
        if not s.ready:
            return f"the worker at {s.url} is recovering its table or rebalancing"
        for p in sorted(s.partitions):
            if p in seen:
                return f"partition {p} is claimed by {seen[p]} and {s.url} (rebalancing)"
            seen[p] = s.url
    missing = sorted(set(range(partitions)) - set(seen))
    if missing:
        return f"no worker that answered holds partitions {missing}"
    return None


def as_shard(url: str, doc: Any) -> Shard:
    """A worker's JSON answer as a :class:`Shard` (:class:`Unavailable` if malformed)."""
    try:
        parts = frozenset(int(p) for p in doc["partitions"])
        return Shard(url, parts, bool(doc["ready"]), doc)
    except (KeyError, TypeError, ValueError) as exc:
        raise Unavailable(f"the worker at {url} answered something else than its part") from exc


def _ident(url: URL) -> tuple[str, int]:
    """(host, port) as Faust's router compares them."""
    return (url.host if url.scheme else url.path) or "", int(url.port or 80)


class Gatherer:
    """Asks every worker holding part of the table (itself directly, the others over HTTP)."""

    def __init__(self, app: Any, table: Any, partitions: int, token: str | None,
                 *, timeout_s: float = ASK_TIMEOUT_S) -> None:
        self.app = app
        self.table = table
        self.partitions = partitions
        self._token = token
        self.timeout_s = timeout_s
        self._local: dict[str, LocalShard] = {}
        self._partition_of: dict[bytes, int] = {}

    def serve(self, kind: str, fun: LocalShard) -> None:
        """``fun`` answers this worker's part of the questions of ``kind``."""
        self._local[kind] = fun

    def serves(self, kind: str) -> bool:
        return kind in self._local

    # -- this worker ------------------------------------------------------------------------------
    def held(self) -> frozenset[int]:
        """The table partitions this worker holds as active (not standby) now."""
        topic = self.table.changelog_topic.get_topic_name()
        return frozenset(tp.partition for tp in self.app.assignor.assigned_actives()
                         if tp.topic == topic)

    def ready(self) -> bool:
        """Table recovered and no rebalance in progress."""
        return bool(self.app.tables.recovery.completed.is_set() and not self.app.rebalancing)

    def partition_of(self, key: bytes) -> int:
        p = self._partition_of.get(key)
        if p is None:
            p = self._partition_of[key] = key_partition(key, self.partitions)
        return p

    def owned(self, keys: Iterable[bytes]) -> list[bytes]:
        """The keys among ``keys`` whose partition this worker holds now."""
        held = self.held()
        return [k for k in keys if self.partition_of(k) in held]

    async def local(self, kind: str, params: Mapping[str, str]) -> dict[str, Any]:
        """This worker's part, as it answers it to the others."""
        held, ready = self.held(), self.ready()
        body = await self._local[kind](params)
        # read again: an assignment that changed while the part was made invalidates it
        if held != self.held():
            ready = False
        return {**body, "url": str(self.app.conf.canonical_url), "partitions": sorted(held),
                "ready": ready}

    # -- every worker ---------------------------------------------------------------------------
    def workers(self) -> list[str]:
        """The web URLs of the workers the router says hold table partitions."""
        hosts = self.app.router.table_metadata(self.table.name)
        return sorted(h for h, topics in hosts.items() if any(topics.values()))

    async def gather(self, kind: str, params: Mapping[str, str] | None = None) -> list[Shard]:
        """Every worker's part; :class:`Unavailable` unless they are the whole table once."""
        params = dict(params or {})
        if self.app.rebalancing:
            raise Unavailable("the planner workers are rebalancing the table")
        hosts = self.workers()
        if not hosts:
            raise Unavailable("no planner worker holds the table yet")
        shards = await asyncio.gather(*(self._ask(h, kind, params) for h in hosts))
        problem = coverage(shards, self.partitions)
        if problem is not None:
            raise Unavailable(problem)
        return shards

    async def owner(self, kind: str, key: bytes, params: Mapping[str, str]) -> Shard:
        """The part of the worker holding ``key``'s partition (:class:`Unavailable` if that
        worker is not known, does not answer, is not ready or does not hold it)."""
        partition = self.partition_of(key)
        topic = self.table.changelog_topic.get_topic_name()
        hosts = self.app.router.table_metadata(self.table.name)
        url = next((h for h, topics in hosts.items() if partition in topics.get(topic, ())),
                   None)
        if url is None:
            raise Unavailable(f"no planner worker holds partition {partition} of the table yet")
        shard = await self._ask(url, kind, dict(params))
        if not shard.ready or partition not in shard.partitions:
            raise Unavailable(f"the worker at {url} does not hold partition {partition} now "
                              "(rebalancing)")
        return shard

    async def _ask(self, url: str, kind: str, params: dict[str, str]) -> Shard:
        if _ident(URL(url)) == _ident(URL(str(self.app.conf.canonical_url))):
            return as_shard(url, await self.local(kind, params))
        target = URL(url).with_path(SHARD_PATH.format(kind=kind))
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
        try:
            async with asyncio.timeout(self.timeout_s):
                async with self.app.http_client.get(target, params=params,
                                                    headers=headers) as resp:
                    if resp.status != 200:
                        raise Unavailable(f"the worker at {url} answered {resp.status}")
                    doc = await resp.json(content_type=None)
        except Unavailable:
            raise
        except Exception as exc:  # aiohttp's errors, a time-out, JSON that does not parse
            log.warning("a worker did not answer its part", extra={
                "url": url, "kind": kind, "error": repr(exc)[:300]})
            raise Unavailable(f"the worker at {url} did not answer ({type(exc).__name__})"
                              ) from exc
        return as_shard(url, doc)


def register_shards(app: Any, gatherer: Gatherer,
                    authorized: Callable[[str | None], bool]) -> None:
    """The internal endpoint through which the workers ask each other for their parts."""

    async def shard(view: Any, request: Any, kind: str) -> Any:
        if not authorized(request.headers.get("Authorization")):
            return view.json({"error": "Unauthorized"}, status=401)
        if not gatherer.serves(kind):
            return view.json({"error": "Unknown part", "details": kind[:64]}, status=404)
        return view.json(await gatherer.local(kind, dict(request.query)))

    app.page(SHARD_PATH, name="api_internal_shard")(shard)
