"""Small pieces of the console's text and JSON output shared by ``cbtstream status`` (from the
table, ``cbtctl.sitestatus``) and the log replay (``cbtctl.replay.render``): the consumer lag,
JSON lines, change IDs and byte counts. Kept apart from the replay's renderer so that the
status from the table does not import the replay (the planner's decision functions, the
lineage checker): at 15,000 disks the command's start-up was a third of its time."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from cbtctl.replay.reader import StageLag


def short_change_id(change_id: str | None, width: int = 14) -> str:
    """Change IDs are long; tables show the epoch's tail and the sequence (JSON has them whole)."""
    if change_id is None:
        return "-"
    epoch, _, seq = change_id.rpartition("/")
    tail = epoch.replace(" ", "").replace("-", "")[-width + 6:]
    return f"…{tail}/{seq}"


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def print_json(console: Console, objects: Iterable[dict[str, Any]]) -> None:
    """One compact JSON object per line (for jq)."""
    for obj in objects:
        console.file.write(json.dumps(obj, separators=(",", ":")) + "\n")
    console.file.flush()


def lag_json(lags: list[StageLag]) -> Iterator[dict[str, Any]]:
    for lag in lags:
        yield {"type": "lag", "stage": lag.stage.name, "group": lag.stage.group,
               "lag": lag.lag, "started": lag.started,
               "partitions": [{"topic": p.topic, "partition": p.partition,
                               "committed": p.committed, "end": p.end, "lag": p.lag}
                              for p in lag.partitions]}


def print_lags(console: Console, lags: list[StageLag]) -> None:
    lag_table = Table(title="Consumer lag", title_justify="left")
    for col in ("stage", "group", "lag", "partitions (committed/end)"):
        lag_table.add_column(col)
    for lag in lags:
        parts = " ".join(f"{p.topic.rsplit('.', 2)[-2]}.{p.topic.rsplit('.', 1)[-1]}/"
                         f"{p.partition}:{p.committed if p.committed is not None else '-'}/"
                         f"{p.end}" for p in lag.partitions if p.end)
        lag_table.add_row(lag.stage.name, lag.stage.group,
                          str(lag.lag) if lag.started else f"{lag.lag} (no offsets)",
                          parts or "-")
    console.print(lag_table)
