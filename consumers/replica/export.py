"""Materialise a restore point of a replica into a file, and prove it against the point's root.

The I/O half of ``cbtstream points export`` (no Kafka here). Under the replica's lock (a sync
running would overwrite the replica while the point is read through it): the point's bytes come
from its undo stores and the live replica (``consumers/points/reader.py``; a file, a block
device or an NBD export, read as ``verify`` reads them), are written to ``.<name>.partial``
(zero chunks skipped: the output is sparse) and hashed as they stream into the replica hash
tree's format (``verify.tree_of``). Only if the tree's root equals the root the point's commit
recorded is the file renamed to its name; otherwise it is removed and :class:`PointMismatch`
raised: a point that cannot be proven is never handed out.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from cbtstream.errors import CbtStreamError
from consumers.copy.sources import NbdSource
from consumers.nbd.uri import parse_nbd_uri
from consumers.points.catalogue import Point
from consumers.replica.location import ReplicaLocation
from consumers.replica.points import chain_of
from consumers.replica.state import TargetKind
from consumers.replica.verify import tree_of


class PointMismatch(CbtStreamError):
    """A materialised point does not hash to the root its commit recorded."""

    reason = "point_mismatch"


@dataclass(frozen=True)
class Exported:
    """A point written to ``path`` and proven: its bytes hash to ``root``."""

    disk_key: str
    point: int
    path: Path
    root: str


#: ``read(offset, length)`` of the live replica, callable from a worker thread.
ReadLive = Callable[[int, int], bytes]


@contextlib.asynccontextmanager
async def live_reader(loc: ReplicaLocation, *, tls_context: ssl.SSLContext | None = None
                      ) -> AsyncIterator[ReadLive]:
    """A blocking reader of the replica (a file, a block device, or an NBD export over one
    connection, its requests sent from the event loop)."""
    if loc.kind == TargetKind.NBD:
        loop = asyncio.get_running_loop()
        async with NbdSource(parse_nbd_uri(loc.location), connections=1,
                             tls_context=tls_context) as src:
            async def read_async(offset: int, length: int) -> bytes:
                buf = memoryview(bytearray(length))
                await src.read_into(offset, buf)
                return bytes(buf)

            def read_nbd(offset: int, length: int) -> bytes:
                return asyncio.run_coroutine_threadsafe(read_async(offset, length),
                                                        loop).result()

            yield read_nbd
        return
    flags = os.O_RDONLY | os.O_CLOEXEC | (os.O_NOFOLLOW if loc.kind == TargetKind.FILE else 0)
    fd = os.open(loc.location, flags)
    try:
        def read_local(offset: int, length: int) -> bytes:
            parts, done = [], 0
            while done < length:
                data = os.pread(fd, length - done, offset + done)
                if not data:
                    raise OSError(f"{loc.location} ends before {offset + done}")
                parts.append(data)
                done += len(data)
            return b"".join(parts)

        yield read_local
    finally:
        os.close(fd)


def tree_version(root: str) -> int:
    """The tree format of a recorded root (``blake3tree2:...``: 2; ``blake3tree:...``: 1)."""
    return 1 if root.startswith("blake3tree:") else 2


async def export_point(loc: ReplicaLocation, disk_key: str, capacity: int, point: Point,
                       out: Path, *, tls_context: ssl.SSLContext | None = None,
                       progress: Callable[[int], None] | None = None) -> Exported:
    """Write ``point`` of the replica at ``loc`` to ``out`` (raw) and prove it (see the
    module docstring). Call under the replica's lock."""
    if not point.complete or point.root_digest is None:
        raise ValueError(f"point {point.id} of {disk_key} is not complete")
    chain = chain_of(loc.store, disk_key, capacity)
    partial = out.with_name(f".{out.name}.partial")
    async with live_reader(loc, tls_context=tls_context) as read_live:
        reader = await asyncio.to_thread(chain.reader, point.id, read_live)
        try:
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(fd, capacity)

                def fill(offset: int, buf: memoryview) -> None:
                    data = reader.read(offset, len(buf))
                    buf[:] = data
                    if data != bytes(len(data)):  # zero chunks stay holes
                        os.pwrite(fd, data, offset)

                async def read_into(offset: int, buf: memoryview) -> None:
                    await asyncio.to_thread(fill, offset, buf)

                tree = await tree_of(read_into, capacity, progress,
                                     tree_version(point.root_digest))
                os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException:
            with contextlib.suppress(OSError):
                partial.unlink()
            raise
        finally:
            reader.close()
    root = tree.root()
    if root != point.root_digest:
        with contextlib.suppress(OSError):
            partial.unlink()
        raise PointMismatch(f"point {point.id} of {disk_key} does not match its hash tree root: "
                            f"read {root}, its commit recorded {point.root_digest}; nothing "
                            "was written")
    os.replace(partial, out)
    return Exported(disk_key, point.id, out, root)
