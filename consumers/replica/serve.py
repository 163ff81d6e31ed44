"""Serving restore points read-only over NBD, without materialising them (the I/O half of
``cbtstream points serve``; the server itself is ``nbdserver.py``, which says why it is ours and
not an nbdkit plugin).

Order of effects, per disk (the disks of a VM in key order, as ``points export`` takes them)::

    lock the replica (a sync running: wait up to wait_s, then ReplicaBusy)
    -> read the catalogue again under the lock: the point must still be there, same root
    -> open the live replica for reading (file, block device, or its NBD export) and the
       point's reader (its undo stores, oldest first)
    -> prove: hash the point as it will be served, in the tree format of the root its commit
       recorded, and compare (skipped with verify=False); a point that does not prove is not
       served (PointMismatch)
    -> [every disk opened] -> listen (127.0.0.1 or a unix socket) -> serve until stopped
    -> stop listening, end the connections -> wait for reads in flight -> close the reader
       -> release the lock

The lock is held the whole time: a sync of the disk would overwrite the live replica (which
serves every byte of the point no undo store covers) under the reader, and its prune could merge
or drop the point's stores. While a point is served, a sync of its disk therefore **waits** for
the lock and runs once the serve ends (the copier waits up to an hour for a replica's lock,
``ReplicaStore.lock``, then fails the sync ``replica_busy`` and retries it a few times); keep
serves short. It is not refused ``replica_in_use``: that is the copier's answer to a lock on the
replica *file* (QEMU's), taken after the replica's lock, which the copier waits for first.
Nothing here writes: not the replica, not the catalogue, not a store.

A point's reader is not safe for concurrent use (its stores cache the last extent they checked),
so the reads of one export are serialised by a lock; exports of several disks read in parallel.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import ssl
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cbtstream.errors import CbtStreamError
from consumers.points import catalogue as cat_mod
from consumers.points.catalogue import Point
from consumers.points.reader import PointReader
from consumers.replica.export import PointMismatch, live_reader, tree_version
from consumers.replica.location import ReplicaLocation
from consumers.replica.nbdserver import Export, ReadOnlyNbdServer
from consumers.replica.points import chain_of
from consumers.replica.verify import tree_of

log = logging.getLogger("cbtstream.points.serve")


class PointGone(CbtStreamError):
    """The point was dropped or merged away between its choice and the replica's lock."""

    reason = "point_gone"


@dataclass(frozen=True)
class ServeTarget:
    """A point to serve: which disk, where its replica is, its capacity, the point."""

    disk_key: str
    location: ReplicaLocation
    capacity: int
    point: Point

    @property
    def export_name(self) -> str:
        """``<vm uuid>-disk-<n>``: the name ``points export`` gives the point's file."""
        return self.disk_key.replace("/", "-")


@dataclass(frozen=True)
class Listen:
    """Where to listen: a unix socket, or ``host:port`` (port 0: any free one)."""

    host: str = "127.0.0.1"
    port: int = 10809
    socket: Path | None = None

    def uri(self, export: str, port: int | None = None) -> str:
        """The NBD URI of ``export`` (``port``: the one actually listened on)."""
        if self.socket is not None:
            return f"nbd+unix:///{export}?socket={self.socket}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"nbd://{host}:{self.port if port is None else port}/{export}"

    @property
    def loopback(self) -> bool:
        if self.socket is not None or self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


class _Guarded:
    """A point's reader behind a lock (see the module docstring); closed once, after the
    read in flight."""

    def __init__(self, reader: PointReader) -> None:
        self._reader = reader
        self._lock = threading.Lock()
        self._closed = False

    def read(self, offset: int, length: int) -> bytes:
        with self._lock:
            if self._closed:
                raise ValueError("the point's reader is closed")
            return self._reader.read(offset, length)

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._reader.close()


async def prove(read: Callable[[int, int], bytes], target: ServeTarget) -> str:
    """Hash the point through ``read`` and compare with its recorded root; the root, or
    :class:`PointMismatch`."""
    point = target.point
    assert point.root_digest is not None

    async def read_into(offset: int, buf: memoryview) -> None:
        buf[:] = await asyncio.to_thread(read, offset, len(buf))

    tree = await tree_of(read_into, target.capacity, None, tree_version(point.root_digest))
    root = tree.root()
    if root != point.root_digest:
        raise PointMismatch(f"point {point.id} of {target.disk_key} does not match its hash tree "
                            f"root: read {root}, its commit recorded {point.root_digest}; not "
                            "served")
    return root


@contextlib.asynccontextmanager
async def open_point(target: ServeTarget, *, wait_s: float, verify: bool,
                     tls_context: ssl.SSLContext | None = None) -> AsyncIterator[Export]:
    """The export of ``target``'s point, proven unless ``verify`` is False, with the replica's
    lock held until the context ends (see the module docstring)."""
    point = target.point
    if not point.complete or point.root_digest is None:
        raise ValueError(f"point {point.id} of {target.disk_key} is not complete")
    store = target.location.store
    async with store.lock(wait_s):
        cat = await asyncio.to_thread(cat_mod.load, store.directory, store.name)
        again = cat.select(str(point.id)) if cat is not None else None
        if again is None or again.root_digest != point.root_digest:
            raise PointGone(f"point {point.id} of {target.disk_key} was dropped meanwhile")
        chain = chain_of(store, target.disk_key, target.capacity)
        async with live_reader(target.location, tls_context=tls_context) as read_live:
            guarded = _Guarded(await asyncio.to_thread(chain.reader, point.id, read_live))
            try:
                if verify:
                    await prove(guarded.read, target)
                yield Export(target.capacity, guarded.read)
            finally:
                # after the read in flight, if any (a cancelled client's thread still runs)
                await asyncio.to_thread(guarded.close)


async def serve_points(targets: Sequence[ServeTarget], listen: Listen, stop: asyncio.Event, *,
                       wait_s: float, verify: bool, tls_context: ssl.SSLContext | None = None,
                       on_ready: Callable[[dict[str, str]], None] | None = None) -> None:
    """Open (lock, prove) every point of ``targets``, serve them until ``stop`` is set, then
    close and release everything. ``on_ready`` gets ``{disk key: NBD URI}`` once clients can
    connect. With one target, the default export (no name) is that point too."""
    if listen.socket is not None and await asyncio.to_thread(os.path.lexists, listen.socket):
        raise CbtStreamError(f"{listen.socket} exists: not replacing it (a serve still "
                             "running, or one that was killed: remove it)")
    async with contextlib.AsyncExitStack() as stack:
        exports: dict[str, Export] = {}
        for t in sorted(targets, key=lambda t: t.disk_key):
            exports[t.export_name] = await stack.enter_async_context(
                open_point(t, wait_s=wait_s, verify=verify, tls_context=tls_context))
        if len(targets) == 1:
            exports[""] = exports[targets[0].export_name]
        server = await stack.enter_async_context(ReadOnlyNbdServer(exports))
        port: int | None = None
        if listen.socket is not None:
            await server.start_unix(listen.socket)
            stack.callback(_unlink, listen.socket)
        else:
            port = await server.start_tcp(listen.host, listen.port)
        uris = {t.disk_key: listen.uri(t.export_name, port) for t in targets}
        if not listen.loopback:
            log.warning("restore points served beyond this host, without TLS or "
                        "authentication: anyone who reaches the address reads them",
                        extra={"bind": listen.host})
        for t in targets:
            log.info("serving a restore point read-only over NBD; a sync of this disk waits "
                     "until the serve ends (the replica's lock is held)", extra={
                         "disk_key": t.disk_key, "point": t.point.id,
                         "vm_snapshot": t.point.vm_snapshot, "uri": uris[t.disk_key],
                         "proven": verify})
        if on_ready is not None:
            on_ready(uris)
        await stop.wait()
        log.info("restore points no longer served; releasing the replicas' locks",
                 extra={"disks": [t.disk_key for t in targets]})


def _unlink(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()
