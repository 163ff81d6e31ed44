"""A sync executor over local snapshot images.

Layout: ``<source root>/<vm uuid>/<vm_snapshot>/disk-<key>.img``.

It copies the whole image (it has no changed-block information), which is correct for full and
incremental plans alike, only slower than CBT. It exists for the walking-skeleton tests and for
sites that export snapshot images as files; production copies go through the NBD engine.
Paths are built from the validated disk key and snapshot id, and both roots come from
configuration; an event cannot name a file.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import time
from pathlib import Path

from cbtstream.errors import CbtStreamError, PermissionDenied
from consumers.executor import ProgressCallback, ProgressUpdate, SyncResult
from schemas.disk import parse_disk_key
from schemas.events import SyncPlanned

_SNAPSHOT_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_CHUNK = 8 * 1024 * 1024


class SourceMissing(CbtStreamError):
    reason = "snapshot_not_found"


def _inside(root: Path, *parts: str) -> Path:
    path = root.joinpath(*parts).resolve()
    if not path.is_relative_to(root.resolve()):
        raise PermissionDenied(f"path escapes {root}")
    return path


def _copy_file(src: Path, dst: Path, progress: ProgressCallback) -> tuple[int, str]:
    """Copy ``src`` over ``dst``, fsync, and return (bytes, sha256 digest of the content)."""
    total = src.stat().st_size
    digest = hashlib.sha256()
    done = 0
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(src, "rb") as fin, open(dst, "r+b" if dst.exists() else "wb") as fout:
        while chunk := fin.read(_CHUNK):
            fout.write(chunk)
            digest.update(chunk)
            done += len(chunk)
            progress(ProgressUpdate(done, total))
        fout.truncate(total)
        fout.flush()
        os.fsync(fout.fileno())
    return done, f"sha256:{digest.hexdigest()}"


class LocalImageExecutor:
    """Copies frozen snapshot images from a local directory to files under the target root."""

    def __init__(self, source_root: Path, target_root: Path) -> None:
        self.source_root = source_root
        self.target_root = target_root

    def source_path(self, plan: SyncPlanned) -> Path:
        vm, key = parse_disk_key(plan.disk.key)
        if not _SNAPSHOT_RE.match(plan.vm_snapshot):
            raise PermissionDenied(f"snapshot id {plan.vm_snapshot[:40]!r} is not a plain name")
        return _inside(self.source_root, vm, plan.vm_snapshot, f"disk-{key}.img")

    def target_path(self, disk_key: str) -> Path:
        vm, key = parse_disk_key(disk_key)
        return _inside(self.target_root, vm, f"disk-{key}.img")

    guards_replicas = False

    async def execute(self, plan: SyncPlanned, progress: ProgressCallback, *,
                      outcome_published: bool = False) -> SyncResult:
        src = self.source_path(plan)
        if not src.is_file():
            raise SourceMissing(f"snapshot image not found for {plan.disk.key} {plan.vm_snapshot}")
        start = time.monotonic()
        copied, digest = await asyncio.to_thread(
            _copy_file, src, self.target_path(plan.disk.key), progress
        )
        return SyncResult(
            replication_type=plan.replication_type,
            reason=plan.reason,
            bytes_copied=copied,
            bytes_zeroed=0,
            extents=1,
            digest=digest,
            duration_s=time.monotonic() - start,
        )

    async def release(self, plan: SyncPlanned) -> None:
        return None
