"""Status from the ``disks`` table: per disk and a site summary, without reading the topics'
history (``cbtstream status`` used to replay every topic from its start, two of them kept
forever: its cost grew with the history, not with the number of disks). Pure.

Each worker computes the status of the rows of its own partitions (:func:`shard_status`); the
worker that answers ``GET /api/v1/status`` gathers every worker's part and merges the summaries
(:func:`merge_summaries`: counts add, the oldest commit is the oldest of the parts), so the
answer is the same whichever worker is asked and however the table is spread.

A disk's state (the names of the log replay, ``cbtctl.replay.status``):

* with a running sync, what its copier last said of it (``SyncProgress``, kept in the worker's
  memory): ``queued`` or ``running``; ``waiting_for_pool`` when no copier reported it and its
  pool has no live copier; ``silent`` when nothing was heard of it (plan, re-issue, report)
  for longer than :attr:`Policy.silent_after_s`; else ``planned``. A worker that just took the
  partition over has heard no report yet: the sync shows ``planned`` until its copier's next
  report (at most ``copier.queue_report_interval_s``);
* else ``failed`` (its last sync failed and nothing was committed since), ``synced`` (a commit)
  or ``new``. ``skipped`` (a disk the VM's snapshots do not capture) is known to the log only:
  ``cbtstream status --from-log`` shows it.

The recovery point of a disk is the snapshot time of its latest commit (``commit_taken_at``;
``committed_at`` for rows written before it was kept). Its age against the disk's RPO is
``met``, ``at_risk`` (older than ``streams.rpo_at_risk`` of it), ``missed`` or ``none`` (never
committed). The disk's RPO is its protection policy's (``DiskState.rpo_s``, from the newest
scheduled snapshot), else ``streams.rpo_s``; an RPO asked for (``--rpo``, ``?rpo_s=``) applies
to every disk. The summary counts these per policy too (``policies``; ``-``: disks no policy
snapshotted). A policy's window is the scheduler's business (it judges ``rpo_missed`` only
inside it); the status measures the replica's age at any hour.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from schemas.events import DEFAULT_POOL, SyncProgress
from streams.state import DiskState

#: The states of a running sync (as ``cbtctl.replay.render.SYNC_STATES``).
COPY_STATES = ("queued", "running", "silent", "planned", "waiting_for_pool")
#: Every state of a disk in this view.
DISK_STATES = (*COPY_STATES, "failed", "synced", "new")
RPO_STATES = ("met", "at_risk", "missed", "none")


@dataclass(frozen=True)
class Policy:
    """What the states are measured against."""

    #: The RPO of disks no protection policy snapshotted (``streams.rpo_s``), or the RPO asked
    #: for every disk (``override``).
    rpo_s: float
    at_risk: float = 0.75
    #: Measure every disk against ``rpo_s``, not against its policy's RPO.
    override: bool = False
    #: A running sync heard of longer ago than this is silent (three report intervals).
    silent_after_s: float = 180.0
    #: Pools known to have no live copier.
    unserved: frozenset[str] = field(default_factory=frozenset)
    #: Live copiers per pool, where known.
    live: Mapping[str, int] = field(default_factory=dict)


def _t(t: datetime | None) -> str | None:
    return t.isoformat().replace("+00:00", "Z") if t is not None else None


def recovery_point(row: DiskState) -> datetime | None:
    """When the data of the disk's replica was captured: its latest commit's snapshot time."""
    if row.change_id is None:
        return None
    return row.commit_taken_at or row.committed_at


def copy_state(row: DiskState, report: tuple[SyncProgress, datetime] | None, now: datetime,
               policy: Policy) -> str:
    """The state of the disk's running sync (the row must have one)."""
    running = row.running
    assert running is not None
    heard = max(t for t in (running.planned_at, row.reissued_at,
                            report[1] if report is not None else None) if t is not None)
    if report is None and running.pool in policy.unserved:
        return "waiting_for_pool"
    if (now - heard).total_seconds() > policy.silent_after_s:
        return "silent"
    return report[0].state if report is not None else "planned"


def disk_state(row: DiskState, report: tuple[SyncProgress, datetime] | None, now: datetime,
               policy: Policy) -> str:
    if row.running is not None:
        return copy_state(row, report, now, policy)
    if row.last_failure is not None:
        return "failed"
    return "synced" if row.change_id is not None else "new"


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)


def micros(t: datetime) -> int:
    """``t`` in whole microseconds since the epoch: ages computed from these are exactly
    ``(now - t).total_seconds()`` (both are a count of microseconds over a million)."""
    return (t - _EPOCH) // _US


def _pair(name: str, value: object) -> str:
    return f"{json.dumps(name)}:{json.dumps(value)}"


@dataclass(frozen=True, slots=True)
class RowStatus:
    """What of a disk's status follows from its row alone, computed once per row object
    (:class:`StatusCache`): the status object without the fields that depend on the instant,
    the policy or the copier's reports (``state`` of a running sync, ``age_s``, ``rpo``,
    ``running``), and the same as JSON text around those fields. Formatting the times and
    encoding the object were nine tenths of a status's cost, paid again at every request."""

    row: DiskState
    key: str
    #: The disk's state when it has no running sync (None: it depends on the reports).
    state: str | None
    #: The recovery point in microseconds since the epoch (:func:`micros`), or None.
    point_us: int | None
    #: The status object with None in place of the four fields above.
    fixed: dict[str, Any]
    #: The row-only fields of ``running`` (None: no running sync).
    running: dict[str, Any] | None
    #: The JSON text of ``fixed`` cut before ``state``, ``age_s``, ``rpo`` and ``running``.
    text: tuple[str, str, str, str, str]


def row_status(row: DiskState, key: str | None = None) -> RowStatus:
    """The row-only part of the disk's status (``key``: its table key, if known)."""
    r = row.running
    running = None if r is None else {
        "sync_id": str(r.sync_id), "vm_snapshot": r.vm_snapshot,
        "replication_type": str(r.replication_type), "planned_at": _t(r.planned_at),
        "state": None, "pool": r.pool, "reissued": row.reissued}
    point = recovery_point(row)
    key = key or row.disk.key
    fixed: dict[str, Any] = {
        "type": "status", "disk": key,
        "vm_instance_uuid": row.disk.vm_instance_uuid,
        "vm_name": row.disk.vm_name, "vm_path": row.disk.vm_path, "disk_id": row.disk.disk_id,
        "state": None, "owner": row.owner, "pool": row.pool or DEFAULT_POOL,
        "policy": row.policy, "policy_rpo_s": row.rpo_s,
        "change_id": row.change_id, "last_sync_at": _t(row.committed_at),
        "recovery_point": _t(point), "age_s": None, "rpo": None,
        "last_type": str(row.replication_type) if row.replication_type else None,
        "commits": row.commits, "running": None,
        "failure": None if row.last_failure is None or r is not None
        else {"reason": str(row.last_failure)},
        "waiting": row.waiting.vm_snapshot if row.waiting is not None else None,
    }
    pieces, text = [], ""
    for name, value in fixed.items():
        sep = "," if name != "type" else ""
        if name in ("state", "age_s", "rpo", "running"):
            pieces.append(f'{text}{sep}"{name}":')
            text = ""
        else:
            text += sep + _pair(name, value)
    pieces.append(text)
    state = None
    if r is None:
        state = "failed" if row.last_failure is not None else (
            "synced" if row.change_id is not None else "new")
    a, b, c, d, e = pieces
    return RowStatus(row=row, key=key, state=state,
                     point_us=None if point is None else micros(point), fixed=fixed,
                     running=running, text=("{" + a, b, c, d, e + "}"))


def _age(rs: RowStatus, now_us: int, policy: Policy) -> tuple[str, float | None]:
    """The disk's recovery point (cached, in microseconds) against the RPO: ``none``, ``met``,
    ``at_risk`` or ``missed``, and its age in seconds."""
    if rs.point_us is None:
        return "none", None
    age = max(0.0, (now_us - rs.point_us) / 1_000_000)
    rpo_s = rpo_of(rs.row, policy)
    if age > rpo_s:
        return "missed", age
    return ("at_risk" if age > policy.at_risk * rpo_s else "met"), age


def rpo_of(row: DiskState, policy: Policy) -> float:
    """The RPO the disk is measured against: the one asked for, else its policy's, else the
    site's."""
    if policy.override or row.rpo_s is None:
        return policy.rpo_s
    return row.rpo_s


def _running(rs: RowStatus, state: str, report: tuple[SyncProgress, datetime] | None
             ) -> dict[str, Any]:
    assert rs.running is not None
    p = report[0] if report is not None else None
    queued = p is not None and p.state == "queued"
    return {**rs.running, "state": state,
            "queue_position": p.queue_position if p is not None else None,
            "wait_reason": p.wait_reason if p is not None else None,
            "bytes_done": p.bytes_done if p is not None and not queued else None,
            "bytes_total": p.bytes_total if p is not None and not queued else None,
            "rate_bytes_per_s": p.rate_bytes_per_s if p is not None and not queued else None,
            "progress_at": _t(report[1]) if report is not None else None}


def status_of(rs: RowStatus, report: tuple[SyncProgress, datetime] | None, now: datetime,
              policy: Policy, now_us: int | None = None) -> tuple[dict[str, Any], str]:
    """The disk's status at ``now`` as a JSON object and as its JSON text (the same object),
    from its cached row-only part. ``now_us``: ``now`` in microseconds (:func:`micros`), when
    many disks are measured at one instant."""
    rpo, age = _age(rs, micros(now) if now_us is None else now_us, policy)
    out = rs.fixed.copy()
    out["age_s"], out["rpo"] = age, rpo
    a, b, c, d, e = rs.text
    if rs.state is not None:
        out["state"] = rs.state
        return out, f'{a}"{rs.state}"{b}{_num(age)}{c}"{rpo}"{d}null{e}'
    state = out["state"] = copy_state(rs.row, report, now, policy)
    running = out["running"] = _running(rs, state, report)
    return out, f'{a}"{state}"{b}{_num(age)}{c}"{rpo}"{d}{json.dumps(running)}{e}'


def _num(age: float | None) -> str:
    return "null" if age is None else float.__repr__(age)


def disk_status(row: DiskState, report: tuple[SyncProgress, datetime] | None, now: datetime,
                policy: Policy, key: str | None = None) -> dict[str, Any]:
    """One disk, as a JSON object (the field names of ``cbtstream status --json --from-log``
    where they mean the same, so scripts read either). ``key``: the row's table key, if known
    (``row.disk.key`` derives it again). A worker answering many keeps the row-only part of
    each row (:class:`StatusCache`, :func:`status_of`); this computes it afresh."""
    return status_of(row_status(row, key), report, now, policy)[0]


class StatusCache:
    """The row-only part of each row's status (:class:`RowStatus`), by table key, valid while
    the row is the same object: a row written (a new ``DiskState``) or recovered from the
    changelog (decoded anew, ``streams.app.PlannerApp.row``) is computed again. Rows are
    frozen, so the same object is the same row."""

    def __init__(self) -> None:
        self._by_key: dict[str, RowStatus] = {}

    def get(self, key: str, row: DiskState) -> RowStatus:
        rs = self._by_key.get(key)
        if rs is None or rs.row is not row:
            rs = self._by_key[key] = row_status(row, key)
        return rs

    def __len__(self) -> int:
        return len(self._by_key)


def matches(row: DiskState, vm: str | None, disk: str | None, key: str | None = None) -> bool:
    """Whether a row (of table key ``key``) is selected by ``vm`` (instance uuid, name or
    inventory path) and ``disk`` (disk key)."""
    if disk is not None and (key or row.disk.key) != disk:
        return False
    d = row.disk
    return vm is None or vm.lower() == d.vm_instance_uuid or vm in (d.vm_name, d.vm_path)


def summarize(disks: Iterable[Mapping[str, Any]], policy: Policy) -> dict[str, Any]:
    """The summary of some disks' status objects (one worker's part, or a whole site)."""
    states: Counter[str] = Counter()
    rpo: Counter[str] = Counter()
    owners: Counter[str] = Counter()
    pools: dict[str, dict[str, Any]] = {}
    policies: dict[str, dict[str, Any]] = {}
    oldest: Mapping[str, Any] | None = None
    waiting = n = 0
    for d in disks:
        n += 1
        states[d["state"]] += 1
        rpo[d["rpo"]] += 1
        name = d["policy"] or UNSCHEDULED
        held = policies.get(name)
        if held is None:
            held = policies[name] = _policy(policy, d)
        held["disks"] += 1
        held["rpo"][d["rpo"]] += 1
        owners[d["owner"]] += 1
        waiting += d["waiting"] is not None
        pool = pools.setdefault(d["pool"], _pool(policy, d["pool"]))
        pool["disks"] += 1
        if d["running"] is not None:
            pool["copies"][d["state"]] += 1
        if d["age_s"] is not None and (oldest is None or d["age_s"] > oldest["age_s"]):
            oldest = d
    return {
        "type": "site", "disks": n, "rpo_s": policy.rpo_s, "rpo_at_risk": policy.at_risk,
        "rpo_override": policy.override,
        "states": {s: states[s] for s in DISK_STATES},
        "copies": {s: states[s] for s in COPY_STATES},
        "rpo": {s: rpo[s] for s in RPO_STATES},
        "owners": dict(sorted(owners.items())),
        "waiting_snapshots": waiting,
        "oldest_commit": None if oldest is None else {
            "disk": oldest["disk"], "vm_name": oldest["vm_name"],
            "recovery_point": oldest["recovery_point"], "age_s": oldest["age_s"]},
        "pools": dict(sorted(pools.items())),
        "policies": dict(sorted(policies.items())),
    }


#: The ``policies`` entry of disks no protection policy snapshotted (policy names start with
#: a letter or a digit).
UNSCHEDULED = "-"


def _policy(policy: Policy, d: Mapping[str, Any]) -> dict[str, Any]:
    rpo_s = policy.rpo_s if policy.override or d["policy_rpo_s"] is None else d["policy_rpo_s"]
    return {"rpo_s": rpo_s, "disks": 0, "rpo": dict.fromkeys(RPO_STATES, 0)}


def _pool(policy: Policy, name: str) -> dict[str, Any]:
    return {"disks": 0, "copies": dict.fromkeys(COPY_STATES, 0),
            "live_copiers": policy.live.get(name)}


def merge_summaries(parts: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """One summary from the summaries of disjoint sets of disks (each worker's)."""
    parts = list(parts)
    if not parts:
        raise ValueError("no summary to merge")
    out: dict[str, Any] = {"type": "site", "disks": 0, "rpo_s": parts[0]["rpo_s"],
                           "rpo_at_risk": parts[0]["rpo_at_risk"],
                           "rpo_override": parts[0].get("rpo_override", False),
                           "states": dict.fromkeys(DISK_STATES, 0),
                           "copies": dict.fromkeys(COPY_STATES, 0),
                           "rpo": dict.fromkeys(RPO_STATES, 0), "owners": {},
                           "waiting_snapshots": 0, "oldest_commit": None, "pools": {},
                           "policies": {}}
    for p in parts:
        out["disks"] += p["disks"]
        out["waiting_snapshots"] += p["waiting_snapshots"]
        for name in ("states", "copies", "rpo", "owners"):
            for k, v in p[name].items():
                out[name][k] = out[name].get(k, 0) + v
        old = p["oldest_commit"]
        if old is not None and (out["oldest_commit"] is None
                                or old["age_s"] > out["oldest_commit"]["age_s"]):
            out["oldest_commit"] = old
        for name, pool in p["pools"].items():
            into = out["pools"].setdefault(name, {"disks": 0,
                                                  "copies": dict.fromkeys(COPY_STATES, 0),
                                                  "live_copiers": None})
            into["disks"] += pool["disks"]
            for k, v in pool["copies"].items():
                into["copies"][k] += v
            if pool["live_copiers"] is not None:
                into["live_copiers"] = max(into["live_copiers"] or 0, pool["live_copiers"])
        for name, held in p.get("policies", {}).items():
            # a policy's RPO as the newest of its disks' rows says (the same everywhere but
            # while a changed RPO reaches every disk)
            into = out["policies"].setdefault(name, {"rpo_s": held["rpo_s"], "disks": 0,
                                                     "rpo": dict.fromkeys(RPO_STATES, 0)})
            into["disks"] += held["disks"]
            for k, v in held["rpo"].items():
                into["rpo"][k] += v
    out["owners"] = dict(sorted(out["owners"].items()))
    out["pools"] = dict(sorted(out["pools"].items()))
    out["policies"] = dict(sorted(out["policies"].items()))
    return out
