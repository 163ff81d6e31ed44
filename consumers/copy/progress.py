"""Progress of disk copies: a snapshot type for callbacks, a throttle, and a rich display.

The engine calls ``on_progress(CopyProgress)`` at most every ``progress_interval_s`` and once at
the end (``final=True``). The pipeline's executor passes the bytes on to the copier, which turns
them into ``SyncProgress`` events; the command line shows them with :class:`RichProgress`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any


@dataclass(frozen=True, slots=True)
class CopyProgress:
    """How far the copy of one disk is (rates and ETAs are the reader's: the copier and the
    progress bar measure their own)."""

    disk_key: str
    bytes_done: int
    bytes_total: int
    final: bool = False


ProgressCallback = Callable[[CopyProgress], None]


class RichProgress:
    """One rich progress bar per disk (bytes, rate, ETA), for interactive commands."""

    def __init__(self, *, transient: bool = False) -> None:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            transient=transient,
        )
        self._tasks: dict[str, Any] = {}

    def __enter__(self) -> RichProgress:
        self._progress.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._progress.stop()

    def callback(self, disk_key: str) -> ProgressCallback:
        """A callback for ``copy_disk(on_progress=...)`` that updates this disk's bar."""

        def update(p: CopyProgress) -> None:
            task = self._tasks.get(disk_key)
            if task is None:
                task = self._progress.add_task(disk_key, total=p.bytes_total)
                self._tasks[disk_key] = task
            self._progress.update(task, completed=p.bytes_done, total=p.bytes_total)

        return update
