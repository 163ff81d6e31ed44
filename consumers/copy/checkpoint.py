"""Resume state of one disk's sync: how far the copy is known to be durable on the target.

One JSON file per (disk key, sync id). The copier keeps it beside the replica's record
(``consumers/replica/store.py``: ``disk-204.img.checkpoint.<sync id>`` next to
``disk-204.img.state``), so whoever can read the record can resume the copy: in a ``shared``
pool a copier on another host picks up an interrupted sync where it stopped. ``cbtstream copy
--state-dir`` keeps it in a directory of its own (``<dir>/<vm uuid>/disk-<n>/<sync id>.json``)::

    {"version": 1, "disk_key": ..., "sync_id": ..., "plan": <plan fingerprint>,
     "durable_until": <offset>, "bytes_copied": n, "bytes_zeroed": n}

``durable_until`` means: every planned byte below this disk offset was written *and* the target
was flushed afterwards. The engine only saves it after a successful target flush, so the order is
always "write -> flush -> save checkpoint". Saving is atomic (temp file, fsync, rename, fsync of
the directory, relative to a directory descriptor opened with ``O_NOFOLLOW`` like the
record's), so a process killed at any moment leaves either the old or the new checkpoint.
A checkpoint whose plan fingerprint differs from the current plan is ignored (different work).
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from cbtstream.errors import CbtStreamError, PermissionDenied
from consumers.copy.dirfiles import open_dir, read_file, unlink_synced, write_atomic
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


#: A checkpoint larger than this is not ours (they are a few hundred bytes).
_MAX_CHECKPOINT = 64 * 1024


def checkpoint_name(replica_name: str, sync_id: str) -> str:
    """The file name of a sync's checkpoint beside the record of ``replica_name``."""
    return f"{replica_name}.checkpoint.{uuid.UUID(str(sync_id))}"


class Checkpoint:
    """Durable resume point of one sync of one disk."""

    def __init__(self, directory: str | os.PathLike[str], disk_key: str, sync_id: str, *,
                 beside: str | None = None) -> None:
        """With ``beside`` (a replica record's name) the checkpoint is ``<directory>/<beside>
        .checkpoint.<sync id>``; without, ``<directory>/<vm uuid>/disk-<n>/<sync id>.json``."""
        try:
            vm_uuid, device_key = parse_disk_key(disk_key)
            sync = str(uuid.UUID(str(sync_id)))
        except ValueError as exc:
            raise PermissionDenied(f"bad checkpoint identity {disk_key!r}/{sync_id!r}") from exc
        self.disk_key = disk_key
        self.sync_id = sync
        if beside is not None:
            if "/" in beside or beside in ("", ".", ".."):
                raise PermissionDenied(f"bad checkpoint name {beside!r}")
            self.dir, self.name = Path(directory), checkpoint_name(beside, sync)
        else:
            self.dir, self.name = Path(directory) / vm_uuid / f"disk-{device_key}", f"{sync}.json"
        self.path = self.dir / self.name

    def _read(self) -> bytes:
        dir_fd = open_dir(self.dir, create=False)
        try:
            return read_file(dir_fd, self.name, _MAX_CHECKPOINT)
        finally:
            os.close(dir_fd)

    def load(self, plan: str) -> CheckpointState | None:
        """The saved state if it exists and belongs to this plan, else None."""
        try:
            doc = json.loads(self._read())
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
        try:
            dir_fd = open_dir(self.dir, create=True)
        except OSError as exc:
            raise CheckpointError(f"cannot save checkpoint {self.path}: {exc.strerror}") from exc
        try:
            write_atomic(dir_fd, self.name, json.dumps(doc).encode())
        except OSError as exc:
            raise CheckpointError(f"cannot save checkpoint {self.path}: {exc.strerror}") from exc
        finally:
            os.close(dir_fd)

    def done(self) -> None:
        """Remove the checkpoint: the sync completed (or was abandoned on purpose)."""
        unlink_synced(self.dir, self.name)
