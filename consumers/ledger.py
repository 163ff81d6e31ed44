"""The copier's ledger of finished syncs: one empty marker file per sync id whose outcome was
published (acknowledged by Kafka).

A plan is delivered again when the copier stops after publishing an outcome but before committing
its offset. Without the ledger the copier would redo that sync; if the snapshot was removed in the
meantime (every disk done), the redo ends in ``SyncFailed(not_found)`` for a sync that already
committed, an audit trail that contradicts itself. With it, a redelivered plan whose outcome is
already published is skipped. Markers older than ``KEEP_S`` are pruned at start-up.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from pathlib import Path

#: Plans are redelivered within minutes (a restart); a week leaves ample margin.
KEEP_S = 7 * 24 * 3600


class SyncLedger:
    """Marker files ``<dir>/<sync id>`` (names are validated UUIDs, never event text)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def _path(self, sync_id: uuid.UUID) -> Path:
        return self.dir / str(uuid.UUID(str(sync_id)))

    def finished(self, sync_id: uuid.UUID) -> bool:
        return self._path(sync_id).exists()

    def record(self, sync_id: uuid.UUID) -> None:
        """Remember that this sync's outcome is published (durably: fsync of the directory)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self._path(sync_id).touch()
        fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def prune(self, now: float | None = None) -> int:
        """Delete markers older than ``KEEP_S``; returns how many."""
        cutoff = (now if now is not None else time.time()) - KEEP_S
        removed = 0
        if not self.dir.is_dir():
            return 0
        for path in self.dir.iterdir():
            with contextlib.suppress(OSError):
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
        return removed
