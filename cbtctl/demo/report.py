"""The per-disk results table of the demo."""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Console
from rich.table import Table


@dataclass(frozen=True)
class CycleRow:
    """One disk in one cycle."""

    cycle: int
    disk_id: str
    replication_type: str
    reason: str
    base_change_id: str | None
    new_change_id: str | None
    bytes_copied: int
    capacity: int
    verified: bool
    outcome: str = "committed"


def _short(change_id: str | None) -> str:
    """``52 8a ... a6/3`` -> ``528a…0da6/3`` so the table fits a terminal."""
    if not change_id:
        return "-"
    epoch, _, seq = change_id.rpartition("/")
    flat = epoch.replace(" ", "").replace("-", "")
    return f"{flat[:4]}…{flat[-4:]}/{seq}"


def _mib(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MiB"


def render(rows: list[CycleRow], console: Console) -> None:
    table = Table(title="cbtstream demo: per-disk results", show_lines=False)
    for col in ("cycle", "disk", "type", "reason", "base -> new change ID", "copied / size",
                "replica"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            str(r.cycle), r.disk_id, r.replication_type, r.reason,
            f"{_short(r.base_change_id)} -> {_short(r.new_change_id)}",
            f"{_mib(r.bytes_copied)} / {_mib(r.capacity)} "
            f"({100 * r.bytes_copied / r.capacity:.1f}%)",
            "equal" if r.verified else "MISMATCH" if r.outcome == "committed" else r.outcome,
        )
    console.print(table)
