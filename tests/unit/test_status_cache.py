"""The cached row-only part of each disk's status (streams/status.py ``RowStatus``,
``StatusCache``) and the worker's part made from it (streams/shards.py): the same answer as a
status computed afresh, as objects and as JSON text, and never stale after a write or a
rebalance. No worker."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from schemas.events import SyncProgress
from streams.gather import Shard
from streams.shards import TableQueries
from streams.state import DiskState, from_json, to_json
from streams.status import StatusCache, disk_status, row_status, status_of, summarize
from tests.unit.factories import disk
from tests.unit.test_site_status import NOW, POLICY, committed, report, running

OTHER = "5012abcd-9999-2222-3333-444455556666"


def rows() -> list[tuple[DiskState, tuple[SyncProgress, datetime] | None]]:
    """A row of every kind, with the report its copier gave (if any)."""
    run = running(committed(2001))
    queued = running(committed(2002))
    named = committed(2003).model_copy(update={"disk": disk(2003).model_copy(
        update={"vm_name": 'Gaël "db" \\ 1', "vm_path": "/DC/vm/Gaël"})})
    waiting = committed(2004).model_copy(update={"waiting": run.running})
    return [(committed(2000), None), (committed(2000, age=timedelta(hours=30)), None),
            (run, report(run)), (queued, report(queued, "queued")),  # type: ignore[list-item]
            (running(committed(2005), pool="idle", planned=timedelta(hours=1)), None),
            (committed(2006).model_copy(update={"last_failure": "sync_timed_out"}), None),
            (DiskState(disk=disk(2007)), None), (named, None), (waiting, None),
            (committed(2008, age=timedelta(microseconds=123_457)), None)]


def test_cached_status_is_the_status_computed_afresh_as_object_and_as_text() -> None:
    for row, rep in rows():
        fresh = disk_status(row, rep, NOW, POLICY)
        obj, text = status_of(row_status(row), rep, NOW, POLICY)
        assert obj == fresh
        assert json.loads(text) == fresh
        assert list(json.loads(text)) == list(fresh)  # the fields in the same order


def test_ages_are_exact_seconds() -> None:
    row = committed(age=timedelta(hours=1, microseconds=7))
    obj, _ = status_of(row_status(row), None, NOW, POLICY)
    assert obj["age_s"] == timedelta(hours=1, microseconds=7).total_seconds()
    ahead = committed(age=-timedelta(seconds=3))  # a clock behind the copier's
    assert status_of(row_status(ahead), None, NOW, POLICY)[0]["age_s"] == 0.0


def test_a_written_row_is_computed_again() -> None:
    cache = StatusCache()
    row = committed(2000)
    key = row.disk.key
    first = cache.get(key, row)
    assert cache.get(key, row) is first  # same row object: no work
    written = running(row)  # the agent puts a new row
    again = cache.get(key, written)
    assert again is not first and again.row is written
    assert status_of(again, None, NOW, POLICY)[0]["state"] == "planned"
    assert len(cache) == 1


def test_a_row_recovered_after_a_rebalance_is_never_served_stale() -> None:
    """After a rebalance the worker decodes the changelog's rows anew (new objects): an equal
    row is computed again, and a row another worker changed meanwhile shows the change."""
    cache = StatusCache()
    row = running(committed(2000))
    key = row.disk.key
    cache.get(key, row)
    recovered = from_json(to_json(row))
    assert recovered is not None and recovered == row
    assert cache.get(key, recovered).row is recovered
    committed_elsewhere = from_json(to_json(committed(2000, age=timedelta(minutes=1))))
    assert committed_elsewhere is not None
    state = status_of(cache.get(key, committed_elsewhere), None, NOW, POLICY)[0]
    assert state["state"] == "synced" and state["age_s"] == 60.0


class _Local:
    def __init__(self, keyed: list[tuple[str, DiskState]],
                 reports: dict[uuid.UUID, tuple[SyncProgress, datetime]]) -> None:
        from cbtstream.config import Settings
        from streams.pools import PoolView

        self.settings = Settings()
        self.pools = PoolView()
        self.reports = reports
        self.status_cache = StatusCache()
        self._keyed = keyed

    def rows(self) -> list[DiskState]:
        return [r for _, r in self._keyed]

    def keyed_rows(self) -> list[tuple[str, DiskState]]:
        return list(self._keyed)

    async def snapshots_processed(self) -> bool:
        return True


class _Gatherer:
    """Two workers: this one (``local``, asked in-process) and a peer answering ``peer``."""

    def __init__(self, peer: Mapping[str, Any] | None = None) -> None:
        self.parts: dict[str, Any] = {}
        self.peer = peer

    def serve(self, kind: str, fun: Any) -> None:
        self.parts[kind] = fun

    async def gather(self, kind: str, params: Mapping[str, str]) -> list[Shard]:
        mine = await self.parts[kind](params)
        shards = [Shard("http://a", frozenset({0}), True, json.loads(json.dumps(mine)))]
        if self.peer is not None:
            body = {**self.peer, "disks": []} if params.get("disks") == "0" else self.peer
            shards.append(Shard("http://b", frozenset({1}), True, body))
        return shards


def test_the_answer_splices_the_workers_texts_in_order() -> None:
    kinds = rows()
    keyed = [(r.disk.key, r) for r, _ in kinds[1:7]]  # distinct disks
    reports = {r.running.sync_id: rep for r, rep in kinds if r.running and rep}
    # a peer of an earlier version answers objects; its disk sorts first (VM "aaa")
    early = committed(2000, vm=OTHER).model_copy(update={"disk": disk(2000, vm=OTHER)
                                                         .model_copy(update={"vm_name": "aaa"})})
    peer_disk = disk_status(early, None, NOW, POLICY)
    peer = {"summary": summarize([peer_disk], POLICY), "disks": [peer_disk]}
    local = _Local(keyed, reports)
    queries = TableQueries(_Gatherer(peer), local)  # type: ignore[arg-type]
    doc = asyncio.run(queries.status({}))
    assert [d["disk"] for d in doc["disks"]] == [early.disk.key, *sorted(k for k, _ in keyed)]
    at, policy = datetime.fromisoformat(doc["as_of"]), queries.policy({})
    ordered = sorted(keyed, key=lambda kv: kv[0])
    for (key, row), got in zip(ordered, doc["disks"][1:], strict=True):
        rep = reports.get(row.running.sync_id) if row.running else None
        assert got == disk_status(row, rep, at, policy, key)
    assert doc["summary"]["disks"] == 7 and len(local.status_cache) == 6
    assert list(doc) == ["as_of", "workers", "summary", "disks"]
    summary_only = asyncio.run(queries.status({"disks": "0"}))
    assert summary_only["disks"] == []
    assert summary_only["summary"]["states"] == doc["summary"]["states"]

