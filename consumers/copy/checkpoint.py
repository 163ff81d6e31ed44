"""Resume state of one disk's sync: how far the copy is known to be durable on the target.

One JSON file per (disk key, sync id) under a state directory::

    <dir>/<vm uuid>/disk-<n>/<sync id>.json
    {"version": 1, "disk_key": ..., "sync_id": ..., "plan": <plan fingerprint>,
     "durable_until": <offset>, "bytes_copied": n, "bytes_zeroed": n}

``durable_until`` means: every planned byte below this disk offset was written *and* the target
was flushed afterwards. The engine only saves it after a successful target flush, so the order is
always "write -> flush -> save checkpoint". Saving is atomic (temp file, fsync, rename, fsync of
the directory), so a process killed at any moment leaves either the old or the new checkpoint.
A checkpoint whose plan fingerprint differs from the current plan is ignored (different work).
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from cbtstream.errors import CbtStreamError, PermissionDenied
from schemas.disk import parse_disk_key


class CheckpointError(CbtStreamError):
    """The checkpoint could not be written."""

    reason = "checkpoint_error"


@dataclass(frozen=True, slots=True)
class CheckpointState:
    plan: str
    durable_until: int
    bytes_copied: int
    bytes_zeroed: int


class Checkpoint:
    """Durable resume point of one sync of one disk."""

    def __init__(self, directory: str | os.PathLike[str], disk_key: str, sync_id: str) -> None:
        try:
            vm_uuid, device_key = parse_disk_key(disk_key)
            sync = str(uuid.UUID(str(sync_id)))
        except ValueError as exc:
            raise PermissionDenied(f"bad checkpoint identity {disk_key!r}/{sync_id!r}") from exc
        self.disk_key = disk_key
        self.sync_id = sync
        self.dir = Path(directory) / vm_uuid / f"disk-{device_key}"
        self.path = self.dir / f"{sync}.json"

    def load(self, plan: str) -> CheckpointState | None:
        """The saved state if it exists and belongs to this plan, else None."""
        try:
            doc = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return None  # unreadable or torn: start over, which is always safe
        if (
            not isinstance(doc, dict)
            or doc.get("version") != 1
            or doc.get("plan") != plan
            or doc.get("disk_key") != self.disk_key
        ):
            return None
        try:
            return CheckpointState(
                plan, int(doc["durable_until"]), int(doc["bytes_copied"]), int(doc["bytes_zeroed"])
            )
        except (KeyError, TypeError, ValueError):
            return None

    def save(self, state: CheckpointState) -> None:
        """Atomically replace the checkpoint (call only after the target was flushed)."""
        doc = {
            "version": 1,
            "disk_key": self.disk_key,
            "sync_id": self.sync_id,
            "plan": state.plan,
            "durable_until": state.durable_until,
            "bytes_copied": state.bytes_copied,
            "bytes_zeroed": state.bytes_zeroed,
        }
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
            try:
                os.write(fd, json.dumps(doc).encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            _fsync_dir(self.dir)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise CheckpointError(f"cannot save checkpoint {self.path}: {exc.strerror}") from exc

    def done(self) -> None:
        """Remove the checkpoint: the sync completed (or was abandoned on purpose)."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
            _fsync_dir(self.dir)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
