"""``cbtstream status`` from the planner's table: ask a worker (``GET /api/v1/status``, which
gathers every worker's part, ``streams.shards``) and show its answer. Its cost follows the
number of disks, not the length of the topics' history (the replay of ``--from-log`` reads
every topic from its start).

JSON lines (``--json``): one ``status`` object per disk (the fields of the replay's ``status``
lines where they mean the same, plus ``recovery_point``, ``age_s`` and ``rpo``), then one
``site`` object (the summary, with ``as_of``, the workers that answered and ``source:
"table"``).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.table import Table

from cbtctl.textfmt import human_bytes, short_change_id
from cbtstream.config import Settings
from cbtstream.errors import CbtStreamError

#: A 15,000-disk answer takes about a second; a worker gathering from a stuck peer gives up
#: after its own 10 s.
TIMEOUT_S = 30.0


class NoWorker(CbtStreamError):
    """No planner worker gave the table's status (down, rebalancing, or refusing)."""


def fetch(settings: Settings, *, vm: str | None = None, disk: str | None = None,
          disks: bool = True, rpo_s: float | None = None) -> dict[str, Any]:
    """The worker's ``GET /api/v1/status`` answer (blocking; :class:`NoWorker` without one)."""
    s = settings.streams
    query = {k: v for k, v in (("vm", vm), ("disk", disk), ("disks", None if disks else "0"),
                               ("rpo_s", None if rpo_s is None else f"{rpo_s:g}"))
             if v is not None}
    url = f"http://{s.web_host}:{s.web_port}/api/v1/status"
    req = urllib.request.Request(f"{url}?{urllib.parse.urlencode(query)}" if query else url)
    if settings.api.token is not None:
        req.add_header("Authorization", f"Bearer {settings.api.token.get_secret_value()}")
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:
            doc = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read()).get("details", "")
        except ValueError:
            detail = ""
        raise NoWorker(f"{url} answered {exc.code} {detail}".strip()) from exc
    except (OSError, ValueError) as exc:
        raise NoWorker(f"{url}: {exc}") from exc
    if not isinstance(doc, dict) or "summary" not in doc:
        raise NoWorker(f"{url} answered something else than a status")
    return doc


def site_json(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from doc["disks"]
    yield {**doc["summary"], "as_of": doc["as_of"], "workers": doc["workers"],
           "source": "table"}


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def _detail(d: dict[str, Any]) -> str:
    r = d["running"]
    if r is not None:
        if r["state"] == "queued":
            text = f"{r['replication_type']} {r['vm_snapshot']} #{r['queue_position']} in queue"
            return text + (f", waiting for {r['wait_reason']}" if r["wait_reason"] else "")
        if r["state"] == "waiting_for_pool":
            return f"{r['replication_type']} {r['vm_snapshot']}: pool {r['pool']!r} has no " \
                   "live copier"
        pct = (f"{100 * r['bytes_done'] / r['bytes_total']:.0f}% "
               if r["bytes_done"] is not None and r["bytes_total"] else "")
        return (f"{r['replication_type']} {r['vm_snapshot']} {pct}"
                f"{human_bytes(r['bytes_done'])}/{human_bytes(r['bytes_total'])}")
    if d["failure"] is not None:
        return f"last sync failed: {d['failure']['reason']}"
    return ""


_STYLE = {"running": "cyan", "queued": "blue", "silent": "bold red", "failed": "red",
          "waiting_for_pool": "bold yellow", "synced": "green"}
_RPO_STYLE = {"missed": "bold red", "at_risk": "yellow", "met": "green"}


def _rpo_counts(rpo: dict[str, int]) -> str:
    return (f"{rpo['met']} met, {rpo['at_risk']} at risk, {rpo['missed']} missed, "
            f"{rpo['none']} never committed")


def print_site(console: Console, doc: dict[str, Any], *, show_disks: bool = True) -> None:
    if show_disks and doc["disks"]:
        table = Table(title="Disks (from the planner's table)", title_justify="left")
        for col in ("vm", "disk", "state", "pool", "owner", "change ID", "recovery point",
                    "age", "RPO", "commits", "detail"):
            table.add_column(col)
        for d in doc["disks"]:
            state, rpo = d["state"], d["rpo"]
            detail = _detail(d) + (f" (waiting: {d['waiting']})" if d["waiting"] else "")
            table.add_row(d["vm_name"], d["disk"],
                          f"[{_STYLE[state]}]{state}[/]" if state in _STYLE else state,
                          d["pool"], d["owner"], short_change_id(d["change_id"]),
                          d["recovery_point"] or "-", _age(d["age_s"]),
                          f"[{_RPO_STYLE[rpo]}]{rpo}[/]" if rpo in _RPO_STYLE else rpo,
                          str(d["commits"]), detail)
        console.print(table)
    s = doc["summary"]

    def counts(m: dict[str, int]) -> str:
        return ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in m.items() if n) or "none"

    console.print(f"Site as of {doc['as_of']} ({len(doc['workers'])} worker(s)): "
                  f"{s['disks']} disks: {counts(s['states'])}")
    console.print(f"RPO: {_rpo_counts(s['rpo'])}")
    policies = s.get("policies", {})
    for name, held in policies.items():
        who = ("no policy (streams.rpo_s)" if name == "-" else f"policy {name}")
        if s.get("rpo_override"):
            who = f"{who}, measured against --rpo"
        console.print(f"  {who}, RPO {_age(held['rpo_s'])}: {held['disks']} disks: "
                      f"{_rpo_counts(held['rpo'])}")
    old = s["oldest_commit"]
    if old is not None:
        console.print(f"Oldest recovery point: {old['recovery_point']} ({_age(old['age_s'])} "
                      f"ago), {old['vm_name']} {old['disk']}")
    console.print(f"Copies: {counts(s['copies'])}; waiting snapshots: {s['waiting_snapshots']}")
    for name, pool in s["pools"].items():
        live = pool["live_copiers"]
        console.print(f"Pool {name}: {pool['disks']} disks, copies {counts(pool['copies'])}, "
                      f"live copiers {'unknown' if live is None else live}")
