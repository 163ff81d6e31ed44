"""Output of ``replay`` and ``status``: rich tables for people, JSON lines for jq.

Every JSON line is one object with a ``type`` field (``link``, ``finding``, ``disk``, ``as_of``,
``status``, ``lag``, ``summary``), so ``jq 'select(.type=="finding")'`` works.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any

from rich.console import Console
from rich.table import Table

from cbtctl.replay.lineage import Finding, Link, ReplayResult, Severity
from cbtctl.replay.reader import StageLag
from cbtctl.replay.status import DiskStatus
from cbtctl.textfmt import human_bytes as _bytes
from cbtctl.textfmt import lag_json, print_lags
from cbtctl.textfmt import short_change_id as _short


def _t(t: datetime | None) -> str | None:
    return t.isoformat().replace("+00:00", "Z") if t is not None else None


def _ts(t: datetime | None) -> str:
    """Table times: to the millisecond, UTC."""
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z") if t else "-"


# -- JSON -----------------------------------------------------------------------------------------
def link_json(key: str, link: Link) -> dict[str, Any]:
    c = link.commit
    return {
        "type": "link", "disk": key, "index": link.index, "time": _t(link.time),
        "vm_snapshot": c.vm_snapshot, "replication_type": str(c.replication_type),
        "reason": str(c.reason), "previous_change_id": c.previous_change_id,
        "change_id": c.change_id, "bytes_copied": c.bytes_copied, "bytes_zeroed": c.bytes_zeroed,
        "extents": c.extents, "digest": c.digest, "replica_digest": c.replica_digest,
        "generation": c.generation, "duration_s": c.duration_s,
        "sync_id": str(c.sync_id), "event_id": str(c.event_id), "origin": c.origin,
        "origin_job_id": c.origin_job_id,
        "coord": link.coord.as_json(),
        "plan_coord": link.plan_coord.as_json() if link.plan_coord else None,
    }


def finding_json(f: Finding) -> dict[str, Any]:
    return {"type": "finding", "severity": str(f.severity), "code": f.code, "disk": f.disk_key,
            "message": f.message, "coords": [c.as_json() for c in f.coords], "time": _t(f.time)}


def summary_json(result: ReplayResult) -> dict[str, Any]:
    counts = {s.value: sum(f.severity == s for f in result.findings) for s in Severity}
    return {"type": "summary", "records": result.records, "disks": len(result.disks),
            "links": sum(len(d.links) for d in result.disks.values()),
            "breaks": counts["break"], "refused": counts["refused"],
            "warnings": counts["warning"], "intact": counts["break"] == 0}


def replay_json(result: ReplayResult) -> Iterator[dict[str, Any]]:
    for key, lin in result.disks.items():
        yield {"type": "disk", "disk": key, "vm_instance_uuid": lin.disk.vm_instance_uuid,
               "vm_name": lin.disk.vm_name, "disk_id": lin.disk.disk_id,
               "records": lin.records, "links": len(lin.links), "baseline": lin.baseline,
               "refused": lin.refused, "superseded": lin.superseded,
               "change_id": lin.links[-1].commit.change_id if lin.links else None}
        for link in lin.links:
            yield link_json(key, link)
    for f in result.findings:
        yield finding_json(f)
    yield summary_json(result)


def as_of_json(result: ReplayResult, t: datetime) -> Iterator[dict[str, Any]]:
    for key, lin in result.disks.items():
        link = lin.change_id_at(t)
        yield {"type": "as_of", "as_of": _t(t), "disk": key, "vm_name": lin.disk.vm_name,
               "change_id": link.commit.change_id if link else None,
               "since": _t(link.time) if link else None,
               "replication_type": str(link.commit.replication_type) if link else None,
               "coord": link.coord.as_json() if link else None}


def status_json(rows: list[DiskStatus], lags: list[StageLag]) -> Iterator[dict[str, Any]]:
    for s in rows:
        r = s.running
        yield {
            "type": "status", "disk": s.key, "vm_instance_uuid": s.vm_instance_uuid,
            "vm_name": s.vm_name, "disk_id": s.disk_id, "state": s.state, "owner": s.owner,
            "pool": s.pool,
            "change_id": s.change_id, "last_sync_at": _t(s.last_sync_at),
            "last_type": s.last_type, "last_reason": s.last_reason, "commits": s.commits,
            "running": None if r is None else {
                "sync_id": str(r.sync_id), "vm_snapshot": r.vm_snapshot,
                "replication_type": r.replication_type, "planned_at": _t(r.planned_at),
                "state": r.state, "queue_position": r.queue_position,
                "wait_reason": r.wait_reason, "pool": r.pool,
                "bytes_done": r.bytes_done, "bytes_total": r.bytes_total,
                "rate_bytes_per_s": r.rate_bytes_per_s, "progress_at": _t(r.progress_at)},
            "failure": None if s.failure is None else {
                "reason": s.failure.reason, "detail": s.failure.detail, "at": _t(s.failure.at)},
            "waiting": s.waiting, "skipped": s.skipped,
        }
    yield {"type": "syncs", **sync_counts(rows)}
    yield from lag_json(lags)


#: The states of a running sync in ``status`` (``cbtctl.replay.status.Running.state``).
SYNC_STATES = ("queued", "running", "silent", "planned", "waiting_for_pool")


def sync_counts(rows: list[DiskStatus]) -> dict[str, int]:
    """How many of the planner's running syncs are queued, running, silent or just planned."""
    counts = dict.fromkeys(SYNC_STATES, 0)
    for s in rows:
        if s.running is not None:
            counts[s.running.state] += 1
    return counts


# -- tables ---------------------------------------------------------------------------------------
_STYLE = {Severity.BREAK: "bold red", Severity.REFUSED: "yellow", Severity.WARNING: "yellow",
          Severity.INFO: "dim"}


def print_replay(console: Console, result: ReplayResult, *, show_info: bool = False) -> None:
    for key, lin in result.disks.items():
        table = Table(title=f"{lin.disk.vm_name} {key}", title_justify="left", expand=False)
        for col in ("#", "time", "snapshot", "type", "reason", "previous", "change ID",
                    "copied", "digest", "record"):
            table.add_column(col, no_wrap=col in ("time", "record"))
        if lin.baseline is not None:
            table.add_row("0", "", "", "", "(window start)", "", _short(lin.baseline), "", "", "")
        for link in lin.links:
            c = link.commit
            table.add_row(str(link.index), _ts(link.time), c.vm_snapshot,
                          str(c.replication_type), str(c.reason), _short(c.previous_change_id),
                          _short(c.change_id), _bytes(c.bytes_copied), c.digest[:15],
                          str(link.coord))
        console.print(table)
    print_findings(console, result.findings, show_info=show_info)
    s = summary_json(result)
    verdict = "[green]chain intact[/]" if s["intact"] else f"[bold red]{s['breaks']} break(s)[/]"
    console.print(f"{s['records']} records, {s['disks']} disks, {s['links']} commits applied, "
                  f"{s['refused']} refused, {s['warnings']} warnings: {verdict}")


def print_findings(console: Console, findings: list[Finding], *, show_info: bool) -> None:
    shown = [f for f in findings if show_info or f.severity != Severity.INFO]
    if not shown:
        return
    table = Table(title="Findings", title_justify="left")
    for col in ("severity", "code", "disk", "records", "message"):
        table.add_column(col)
    for f in shown:
        table.add_row(f"[{_STYLE[f.severity]}]{f.severity}[/]", f.code, f.disk_key or "-",
                      "\n".join(str(c) for c in f.coords), f.message)
    console.print(table)


def print_as_of(console: Console, result: ReplayResult, t: datetime) -> None:
    table = Table(title=f"Change ID of every disk as of {_t(t)}", title_justify="left")
    for col in ("vm", "disk", "change ID", "committed at", "type", "record"):
        table.add_column(col)
    for obj in as_of_json(result, t):
        coord = obj["coord"]
        table.add_row(obj["vm_name"], obj["disk"], obj["change_id"] or "-", obj["since"] or "-",
                      obj["replication_type"] or "-",
                      f"{coord['topic']}/{coord['partition']}@{coord['offset']}" if coord
                      else "-")
    console.print(table)


def print_status(console: Console, rows: list[DiskStatus], lags: list[StageLag]) -> None:
    table = Table(title="Disks", title_justify="left")
    for col in ("vm", "disk", "state", "pool", "owner", "change ID", "last sync",
                "type / reason", "commits", "detail"):
        table.add_column(col)
    for s in rows:
        detail = ""
        if s.running is not None:
            r = s.running
            if r.reported == "queued":
                detail = f"{r.replication_type} {r.vm_snapshot} #{r.queue_position} in queue"
                if r.wait_reason:
                    detail += f", waiting for {r.wait_reason}"
            elif r.state == "waiting_for_pool":
                detail = (f"{r.replication_type} {r.vm_snapshot}: pool {r.pool!r} has no live "
                          "copier")
            else:
                pct = f"{r.percent:.0f}% " if r.percent is not None else ""
                detail = (f"{r.replication_type} {r.vm_snapshot} {pct}"
                          f"{_bytes(r.bytes_done)}/{_bytes(r.bytes_total)}")
            if r.silent:
                detail += f" (last heard {_ts(r.progress_at or r.planned_at)})"
        elif s.skipped is not None:
            detail = f"not captured by snapshots ({s.skipped}): not replicated"
        elif s.failure is not None:
            detail = f"{s.failure.reason}: {s.failure.detail[:60]}"
        if s.waiting:
            detail += f" (waiting: {s.waiting})"
        style = {"running": "cyan", "queued": "blue", "silent": "bold red", "failed": "red",
                 "waiting_for_pool": "bold yellow",
                 "synced": "green", "skipped": "yellow"}.get(s.state, "")
        table.add_row(s.vm_name, s.key, f"[{style}]{s.state}[/]" if style else s.state,
                      s.pool, s.owner, _short(s.change_id), _ts(s.last_sync_at),
                      f"{s.last_type}/{s.last_reason}" if s.last_type else "-", str(s.commits),
                      detail)
    console.print(table)
    counts = sync_counts(rows)
    if any(counts.values()):
        console.print("Syncs: " + ", ".join(f"{n} {state}" for state, n in counts.items()))
    if lags:
        print_lags(console, lags)
