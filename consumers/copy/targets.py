"""Block writers: the write side of a copy, a local file or block device (:class:`FileTarget`)
or an NBD export (:class:`NbdTarget`), and the openers that refuse what must never be written.

*Which* target a disk goes to is decided elsewhere, from the configuration alone
(``consumers/replica/location.py``); this module only opens and writes what it is given:

* files: :func:`open_below` opens ``<root>/<rel>`` for a plain relative ``rel`` (no absolute
  path, no ``..``), and no component below the root may be a symlink: each is opened with
  ``O_NOFOLLOW`` relative to its parent directory's descriptor, so a symlink swapped in between
  a check and the open is refused too. The file is then locked (:func:`lock_replica`, an
  exclusive open-file-description lock on all of it, held until the target is closed) before
  anything changes it: a VM or a tool that opened the replica (QEMU locks the images it opens)
  makes the sync fail with ``replica_in_use`` and the replica untouched, and while the copier
  writes, QEMU refuses to open it;
* block devices: :func:`open_block` opens with ``O_EXCL``, so a mounted or otherwise held
  device is refused;
* NBD exports: :class:`NbdTarget` refuses a read-only export (its endpoint was checked against
  ``nbd_allow`` when it was placed).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import stat
import struct
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import Protocol, TypeVar, runtime_checkable

from cbtstream.errors import CbtStreamError, PermissionDenied
from consumers.nbd.client import NbdClient
from consumers.nbd.errors import NbdError
from consumers.nbd.uri import NbdAddress

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10
_ZEROS = bytes(1024 * 1024)
#: Zero runs are issued in pieces no larger than this (NBD lengths are 32-bit).
_MAX_ZERO = 1 << 30
#: Writes up to this size are issued on the event loop thread (microseconds to the page cache).
_INLINE_WRITE = 256 * 1024
_T = TypeVar("_T")
#: ``fcntl`` command of open-file-description locks (Linux 3.15+; its value on every Linux).
_F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
#: ``struct flock``: l_type, l_whence, l_start, l_len, l_pid (0 for OFD locks), native layout.
_FLOCK = "hhqqi4x"

log = logging.getLogger(__name__)


class TargetError(CbtStreamError):
    """The target could not be opened, written or flushed."""

    reason = "target_error"


class ReplicaInUse(TargetError):
    """Another process holds a lock on the replica file: a VM booted from it, ``qemu-img``,
    ``qemu-nbd``, another copier. The sync does not write it."""

    reason = "replica_in_use"


def lock_replica(fd: int, path: str | os.PathLike[str]) -> bool:
    """Take an exclusive OFD write lock on the whole file behind ``fd`` (released when that
    descriptor is closed; another descriptor of this process does not release it, unlike a
    classic POSIX lock). Raises :class:`ReplicaInUse` if another opener holds a conflicting
    lock (QEMU takes shared locks on the images it opens). A file system without locks
    (``ENOLCK``, ``EOPNOTSUPP``) is written unlocked with a warning: returns False."""
    request = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
    try:
        fcntl.fcntl(fd, _F_OFD_SETLK, request)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            raise ReplicaInUse(
                f"replica {os.fspath(path)} is locked by another process (a VM or a tool such "
                "as qemu-img or qemu-nbd has it open): not written; close it, or fail the VM "
                "over, and the next sync writes it") from exc
        if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            log.warning("the replica's file system offers no locks: written unlocked",
                        extra={"path": os.fspath(path), "error": exc.strerror})
            return False
        raise TargetError(f"cannot lock replica {os.fspath(path)}: {exc.strerror}") from exc
    return True


@runtime_checkable
class BlockTarget(Protocol):
    """Write side of a copy. ``flush`` makes every completed write durable."""

    @property
    def size(self) -> int: ...

    @property
    def max_request(self) -> int: ...

    async def write(self, offset: int, buf: memoryview) -> None: ...

    async def zero(self, offset: int, length: int) -> None: ...

    async def flush(self) -> None: ...

    async def read_into(self, offset: int, buf: memoryview) -> None: ...


_libc: ctypes.CDLL | None = None


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class FileTarget:
    """A replica file or block device: ``pwrite``, hole punching for zero runs, ``fdatasync``."""

    def __init__(self, path: str | os.PathLike[str], fd: int) -> None:
        self.path = os.fspath(path)
        self._fd = fd
        self._size = os.lseek(fd, 0, os.SEEK_END)
        self._punch = True
        #: One thread writes and zeroes, one request at a time, in the order asked: writes
        #: into one file serialize on its inode lock anyway (writers in asyncio's default pool
        #: spun on it), and every thread more takes the GIL back against the event loop's.
        self._writer: ThreadPoolExecutor | None = None

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> FileTarget:
        """Open an existing file or block device for writing (no resolution, for tests/tools)."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError as exc:
            raise TargetError(f"cannot open target {path}: {exc.strerror}") from exc
        return cls(path, fd)

    @property
    def size(self) -> int:
        return self._size

    @property
    def max_request(self) -> int:
        return 1 << 30

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        self.close()

    def close(self) -> None:
        """Close the descriptor (releasing the replica's lock) after the writer thread's
        requests; safe twice."""
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    async def __aenter__(self) -> FileTarget:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    def write_sync(self, offset: int, buf: memoryview) -> None:
        """Blocking ``pwrite`` of all of ``buf`` (releases the GIL; call from a thread)."""
        if offset + len(buf) > self._size:
            raise TargetError(f"write beyond the end of {self.path}")
        done = 0
        try:
            while done < len(buf):
                done += os.pwrite(self._fd, buf[done:], offset + done)
        except OSError as exc:
            raise TargetError(f"write to {self.path} at {offset} failed: {exc.strerror}") from exc

    async def write(self, offset: int, buf: memoryview) -> None:
        if len(buf) <= _INLINE_WRITE:
            self.write_sync(offset, buf)  # a page-cache copy: cheaper than a thread hop
            return
        await self._in_writer(self.write_sync, offset, buf)

    async def _in_writer(self, fn: Callable[[int, _T], None], offset: int, arg: _T) -> None:
        if self._writer is None:
            self._writer = ThreadPoolExecutor(1, "cbt-write")
        await asyncio.get_running_loop().run_in_executor(self._writer, fn, offset, arg)

    def zero_sync(self, offset: int, length: int) -> None:
        if offset + length > self._size:
            raise TargetError(f"zeroing beyond the end of {self.path}")
        try:
            if self._punch:
                try:
                    _fallocate(
                        self._fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length
                    )
                    return
                except OSError as exc:
                    if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                        raise
                    self._punch = False
            for start in range(offset, offset + length, len(_ZEROS)):
                n = min(len(_ZEROS), offset + length - start)
                self.write_sync(start, memoryview(_ZEROS)[:n])
        except OSError as exc:
            raise TargetError(f"zeroing {self.path} at {offset} failed: {exc.strerror}") from exc

    async def zero(self, offset: int, length: int) -> None:
        await self._in_writer(self.zero_sync, offset, length)

    async def flush(self) -> None:
        try:
            await asyncio.to_thread(os.fdatasync, self._fd)
        except OSError as exc:
            raise TargetError(f"fdatasync of {self.path} failed: {exc.strerror}") from exc

    def read_sync(self, offset: int, buf: memoryview) -> None:
        done = 0
        while done < len(buf):
            n = os.preadv(self._fd, [buf[done:]], offset + done)
            if n == 0:
                raise TargetError(f"unexpected end of {self.path}")
            done += n

    async def read_into(self, offset: int, buf: memoryview) -> None:
        await asyncio.to_thread(self.read_sync, offset, buf)


class NbdTarget:
    """An NBD export as the target: WRITE, WRITE_ZEROES, FLUSH over one connection."""

    def __init__(self, address: NbdAddress, **client_kwargs: object) -> None:
        self.client = NbdClient(address, want_block_status=False, **client_kwargs)  # type: ignore[arg-type]

    @property
    def size(self) -> int:
        return self.client.size

    @property
    def max_request(self) -> int:
        return self.client.max_block

    async def start(self) -> None:
        await self.client.start()
        if self.client.read_only:
            await self.client.stop()
            raise TargetError(f"NBD target {self.client.address.endpoint()} is read-only")

    async def stop(self) -> None:
        with contextlib.suppress(NbdError):
            await self.client.stop()

    async def __aenter__(self) -> NbdTarget:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def write(self, offset: int, buf: memoryview) -> None:
        await self.client.write(offset, buf)

    async def zero(self, offset: int, length: int) -> None:
        for start in range(offset, offset + length, _MAX_ZERO):
            await self.client.write_zeroes(start, min(_MAX_ZERO, offset + length - start))

    async def flush(self) -> None:
        await self.client.flush()

    async def read_into(self, offset: int, buf: memoryview) -> None:
        await self.client.read_into(offset, buf)


def open_below(root: Path, rel: PurePosixPath, capacity: int) -> FileTarget:
    """Open ``<root>/<rel>``, creating directories and the file, at least ``capacity`` bytes.

    A regular file is created or extended to ``capacity`` (never truncated: a larger replica
    is refused, since a shrunk disk is a different disk). Every component below the root is
    opened with ``O_NOFOLLOW`` relative to its parent's descriptor. ``rel`` must be a plain
    relative path (placement produces only such); anything else is refused, not trusted.
    """
    if rel.is_absolute() or not rel.parts or any(p in ("", ".", "..") for p in rel.parts):
        raise PermissionDenied(f"refusing {rel}: not a plain path below the target root")
    path = root.joinpath(*rel.parts)
    try:
        os.makedirs(root, exist_ok=True)
        dir_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise TargetError(f"cannot open target root {root}: {exc.strerror}") from exc
    try:
        for part in rel.parts[:-1]:
            with contextlib.suppress(FileExistsError):
                os.mkdir(part, 0o750, dir_fd=dir_fd)
            child = _open_nofollow(part, os.O_RDONLY | os.O_DIRECTORY, dir_fd, path)
            os.close(dir_fd)
            dir_fd = child
        fd = _open_nofollow(rel.parts[-1], os.O_RDWR | os.O_CREAT, dir_fd, path, mode=0o640)
        try:
            target = _prepare(path, fd, capacity)
        except BaseException:
            os.close(fd)
            raise
        os.fsync(dir_fd)  # the file's directory entry is durable too
        return target
    finally:
        os.close(dir_fd)


def _prepare(path: Path, fd: int, capacity: int) -> FileTarget:
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode):
        lock_replica(fd, path)  # before the file is extended or written
        if st.st_size > capacity:
            raise TargetError(
                f"replica {path} is {st.st_size} bytes, larger than the disk ({capacity})"
            )
        if st.st_size < capacity:
            os.ftruncate(fd, capacity)
    elif stat.S_ISBLK(st.st_mode):
        if os.lseek(fd, 0, os.SEEK_END) < capacity:
            raise TargetError(f"block device {path} is smaller than the disk ({capacity})")
    else:
        raise PermissionDenied(f"replica {path} is neither a regular file nor a block device")
    return FileTarget(path, fd)


def open_block(path: str, capacity: int) -> FileTarget:
    """Open a mapped block device for writing. ``O_EXCL`` makes the kernel refuse a device that
    is mounted or held by another opener (a file system, LVM, another copier): the copier must
    never write under a live file system."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_EXCL | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise PermissionDenied(f"block device {path} is in use (mounted or held)") from exc
        raise TargetError(f"cannot open block device {path}: {exc.strerror}") from exc
    try:
        if not stat.S_ISBLK(os.fstat(fd).st_mode):
            raise PermissionDenied(f"{path} is not a block device")
        return _prepare(Path(path), fd, capacity)
    except BaseException:
        os.close(fd)
        raise


def _open_nofollow(name: str, flags: int, dir_fd: int, full: Path, mode: int = 0o777) -> int:
    try:
        return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise PermissionDenied(
                f"refusing {full}: a symlink or non-directory below the target root"
            ) from exc
        raise TargetError(f"cannot open {full}: {exc.strerror}") from exc
