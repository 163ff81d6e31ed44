"""Where replicas are written: a local file or block device, or an NBD export.

Which target a disk goes to is decided here, by :class:`TargetResolver`, from the configuration
alone (``copier.target_root``, ``copier.targets``, ``copier.device_allow``, ``copier.nbd_allow``)
and the disk key. Nothing in an event names a path or an endpoint, so nothing outside what the
operator configured can be written:

* files: the disk key must parse as ``<vm uuid>/disk-<n>``; the file is ``<root>/<vm uuid>/
  disk-<n>.img`` or the mapping's path *below* the root (no absolute paths, no ``..``), and no
  component below the root may be a symlink (opened with ``O_NOFOLLOW`` relative to directory
  descriptors, so a symlink swapped in between a check and the open is refused too);
* block devices: only paths an operator mapped *and* that match a ``device_allow`` glob, opened
  with ``O_EXCL`` so a mounted or otherwise held device is refused;
* NBD exports: only URIs an operator mapped whose endpoint is in ``nbd_allow``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fnmatch
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import Protocol, runtime_checkable

from cbtstream.config import CopierSettings, TargetMapping
from cbtstream.errors import CbtStreamError, PermissionDenied
from consumers.nbd.client import NbdClient
from consumers.nbd.errors import NbdError
from consumers.nbd.uri import NbdAddress, check_allowed, parse_nbd_uri
from consumers.replica.state import TargetIdentity, TargetKind
from consumers.replica.store import ReplicaStore
from schemas.disk import parse_disk_key

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10
_ZEROS = bytes(1024 * 1024)
#: Zero runs are issued in pieces no larger than this (NBD lengths are 32-bit).
_MAX_ZERO = 1 << 30
#: Writes up to this size are issued on the event loop thread (microseconds to the page cache).
_INLINE_WRITE = 256 * 1024


class TargetError(CbtStreamError):
    """The target could not be opened, written or flushed."""

    reason = "target_error"


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
        else:
            await asyncio.to_thread(self.write_sync, offset, buf)

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
        await asyncio.to_thread(self.zero_sync, offset, length)

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


@dataclass(frozen=True)
class ReplicaLocation:
    """Where one disk's replica lives and where its record is kept (decided by configuration)."""

    disk_key: str
    kind: TargetKind
    #: Absolute path of a file or block device, or the NBD URI.
    location: str
    store: ReplicaStore
    #: For file replicas: the path below ``target_root``.
    relpath: PurePosixPath | None = None


def _expand(template: str, vm_uuid: str, device_key: int) -> str:
    return (template.replace("{vm}", vm_uuid).replace("{device_key}", str(device_key))
            .replace("{disk_id}", f"disk-{device_key}"))


def _safe_relpath(text: str) -> PurePosixPath:
    rel = PurePosixPath(text)
    if rel.is_absolute() or not rel.parts or any(p in ("", ".", "..") for p in rel.parts):
        raise PermissionDenied(f"target file {text!r} is not a plain path below target_root")
    return rel


def _slug(kind: TargetKind, location: str) -> str:
    return f"{kind.value}-{hashlib.sha256(location.encode()).hexdigest()[:32]}"


class TargetResolver:
    """Maps a disk key to its replica: an operator-chosen target (``copier.targets``) or the
    default file ``<target_root>/<vm uuid>/disk-<n>.img``; refuses escapes."""

    def __init__(self, settings: CopierSettings) -> None:
        self.settings = settings
        self.root = Path(os.path.abspath(settings.target_root))
        self.state_root = Path(os.path.abspath(settings.state_dir)) / "targets"

    @staticmethod
    def _parse(disk_key: str) -> tuple[str, int]:
        try:
            vm_uuid, device_key = parse_disk_key(disk_key)
        except ValueError as exc:
            raise PermissionDenied(f"not a disk key: {disk_key[:100]!r}") from exc
        if device_key < 0 or "/" in vm_uuid or vm_uuid in ("", ".", ".."):
            raise PermissionDenied(f"not a disk key: {disk_key[:100]!r}")
        return vm_uuid, device_key

    def path_for(self, disk_key: str) -> Path:
        """The default replica path of a disk (pure: no file system access)."""
        vm_uuid, device_key = self._parse(disk_key)
        return self.root / vm_uuid / f"disk-{device_key}.img"

    def mapping_for(self, disk_key: str) -> TargetMapping | None:
        """The operator's mapping of a disk: a per-disk one wins over a per-VM one."""
        vm_uuid, _ = self._parse(disk_key)
        by_vm = None
        for m in self.settings.targets:
            if m.disk == disk_key:
                return m
            if by_vm is None and m.vm is not None and m.vm.lower() == vm_uuid:
                by_vm = m
        return by_vm

    def locate(self, disk_key: str) -> ReplicaLocation:
        """Where the replica of ``disk_key`` is (pure apart from nothing: no file system access).

        Raises :class:`PermissionDenied` for a mapping outside what the configuration allows
        (a file escaping ``target_root``, a device not in ``device_allow``, an NBD endpoint not
        in ``nbd_allow``).
        """
        vm_uuid, device_key = self._parse(disk_key)
        m = self.mapping_for(disk_key)
        if m is None or m.file is not None:
            text = (_expand(m.file, vm_uuid, device_key) if m is not None and m.file
                    else f"{vm_uuid}/disk-{device_key}.img")
            rel = _safe_relpath(text)
            path = self.root.joinpath(*rel.parts)
            return ReplicaLocation(disk_key, TargetKind.FILE, str(path),
                                   ReplicaStore(path.parent, path.name), rel)
        if m.device is not None:
            device = _expand(m.device, vm_uuid, device_key)
            if not os.path.isabs(device) or not any(
                fnmatch.fnmatchcase(device, g) for g in self.settings.device_allow
            ):
                raise PermissionDenied(f"block device {device!r} is not in copier.device_allow")
            return ReplicaLocation(disk_key, TargetKind.BLOCK, device,
                                   ReplicaStore(self.state_root, _slug(TargetKind.BLOCK, device)))
        assert m.nbd is not None
        uri = _expand(m.nbd, vm_uuid, device_key)
        check_allowed(parse_nbd_uri(uri), self.settings.nbd_allow)
        return ReplicaLocation(disk_key, TargetKind.NBD, uri,
                               ReplicaStore(self.state_root, _slug(TargetKind.NBD, uri)))

    # -- identity -------------------------------------------------------------------------------
    def identity(self, loc: ReplicaLocation) -> TargetIdentity | None:
        """The identity of a file or block device target now; None if it does not exist."""
        if loc.kind == TargetKind.NBD:
            raise ValueError("the identity of an NBD target is known once connected")
        is_file = loc.kind == TargetKind.FILE
        try:
            st = os.stat(loc.location, follow_symlinks=not is_file)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise TargetError(f"cannot stat {loc.location}: {exc.strerror}") from exc
        if is_file:
            if not stat.S_ISREG(st.st_mode):
                raise PermissionDenied(f"replica {loc.location} is not a regular file")
            return TargetIdentity(kind=TargetKind.FILE, location=loc.location,
                                  device=st.st_dev, inode=st.st_ino, size=st.st_size)
        if not stat.S_ISBLK(st.st_mode):
            raise PermissionDenied(f"{loc.location} is not a block device")
        return TargetIdentity(kind=TargetKind.BLOCK, location=loc.location,
                              device=st.st_rdev, size=_device_size(loc.location))

    @staticmethod
    def nbd_identity(loc: ReplicaLocation, target: NbdTarget) -> TargetIdentity:
        return TargetIdentity(kind=TargetKind.NBD, location=loc.location, size=target.size)

    # -- opening ------------------------------------------------------------------------------
    def open(self, loc: ReplicaLocation, capacity: int, **nbd_kwargs: object) -> BlockTarget:
        """Open (creating a missing file) the target of ``loc`` for writing; NBD targets must
        be started (``async with``)."""
        if loc.kind == TargetKind.FILE:
            assert loc.relpath is not None
            return self._open_file(loc.relpath, capacity)
        if loc.kind == TargetKind.BLOCK:
            return _open_block(loc.location, capacity)
        return NbdTarget(parse_nbd_uri(loc.location), **nbd_kwargs)

    def target_for(self, disk_key: str, capacity: int) -> FileTarget:
        """Open (creating if needed) the default replica file of ``disk_key``."""
        vm_uuid, device_key = self._parse(disk_key)
        return self._open_file(PurePosixPath(vm_uuid, f"disk-{device_key}.img"), capacity)

    def _open_file(self, rel: PurePosixPath, capacity: int) -> FileTarget:
        """Open ``<root>/<rel>``, creating directories and the file, at least ``capacity`` bytes.

        A regular file is created or extended to ``capacity`` (never truncated: a larger replica
        is refused, since a shrunk disk is a different disk). Every component below the root is
        opened with ``O_NOFOLLOW`` relative to its parent's descriptor.
        """
        path = self.root.joinpath(*rel.parts)
        try:
            os.makedirs(self.root, exist_ok=True)
            dir_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise TargetError(f"cannot open target root {self.root}: {exc.strerror}") from exc
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


def _device_size(path: str) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def _open_block(path: str, capacity: int) -> FileTarget:
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
