"""Where each disk's replica lives: a file below ``target_root``, a mapped block device, or a
mapped NBD export, and where its record (and its resume checkpoints) are kept: beside a file
replica, in ``copier.record_dir`` for the others.

Placement is decided here, by :class:`TargetResolver`, from the configuration alone
(``copier.target_root``, ``copier.targets``, ``copier.device_allow``, ``copier.nbd_allow``) and
the disk key. Nothing in an event names a path or an endpoint, so nothing outside what the
operator configured can be written:

* files: the disk key must parse as ``<vm uuid>/disk-<n>``; the file is ``<root>/<vm uuid>/
  disk-<n>.img`` or the mapping's path *below* the root (no absolute paths, no ``..``);
  opening it refuses a symlink anywhere below the root (``consumers/copy/targets.py``,
  :func:`~consumers.copy.targets.open_below`);
* block devices: only paths an operator mapped *and* that match a ``device_allow`` glob (opened
  with ``O_EXCL`` by :func:`~consumers.copy.targets.open_block`);
* NBD exports: only URIs an operator mapped whose endpoint is in ``nbd_allow``.

A plan's placement is resolved once (:meth:`TargetResolver.locate`) and the
:class:`ReplicaLocation` passed on to whatever needs it (the replica session, the opener).
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from cbtstream.config import CopierSettings, TargetMapping
from cbtstream.errors import PermissionDenied
from consumers.copy.targets import (
    BlockTarget,
    FileTarget,
    NbdTarget,
    TargetError,
    open_below,
    open_block,
)
from consumers.nbd.uri import check_allowed, parse_nbd_uri
from consumers.replica.state import TargetIdentity, TargetKind
from consumers.replica.store import ReplicaStore
from schemas.disk import parse_disk_key


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

    def identity(self) -> TargetIdentity | None:
        """The identity of a file or block device target now; None if it does not exist."""
        if self.kind == TargetKind.NBD:
            raise ValueError("the identity of an NBD target is known once connected")
        is_file = self.kind == TargetKind.FILE
        try:
            st = os.stat(self.location, follow_symlinks=not is_file)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise TargetError(f"cannot stat {self.location}: {exc.strerror}") from exc
        if is_file:
            if not stat.S_ISREG(st.st_mode):
                raise PermissionDenied(f"replica {self.location} is not a regular file")
            return TargetIdentity(kind=TargetKind.FILE, location=self.location,
                                  device=st.st_dev, inode=st.st_ino, size=st.st_size)
        if not stat.S_ISBLK(st.st_mode):
            raise PermissionDenied(f"{self.location} is not a block device")
        return TargetIdentity(kind=TargetKind.BLOCK, location=self.location,
                              device=st.st_rdev, size=_device_size(self.location))

    def nbd_identity(self, target: NbdTarget) -> TargetIdentity:
        """The identity of an NBD target, once connected (its size is the export's)."""
        return TargetIdentity(kind=TargetKind.NBD, location=self.location, size=target.size)


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


def _device_size(path: str) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


class TargetResolver:
    """Maps a disk key to its replica: an operator-chosen target (``copier.targets``) or the
    default file ``<target_root>/<vm uuid>/disk-<n>.img``; refuses escapes."""

    def __init__(self, settings: CopierSettings) -> None:
        self.settings = settings
        self.root = Path(os.path.abspath(settings.target_root))
        #: Where the records of block-device and NBD replicas are (``copier.record_dir``).
        self.state_root = Path(os.path.abspath(settings.record_dir))

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

    # -- opening ------------------------------------------------------------------------------
    def open(self, loc: ReplicaLocation, capacity: int, **nbd_kwargs: object) -> BlockTarget:
        """Open (creating a missing file) the target of ``loc`` for writing; NBD targets must
        be started (``async with``)."""
        if loc.kind == TargetKind.FILE:
            assert loc.relpath is not None
            return open_below(self.root, loc.relpath, capacity)
        if loc.kind == TargetKind.BLOCK:
            return open_block(loc.location, capacity)
        return NbdTarget(parse_nbd_uri(loc.location), **nbd_kwargs)

    def target_for(self, disk_key: str, capacity: int) -> FileTarget:
        """Open (creating if needed) the default replica file of ``disk_key``."""
        vm_uuid, device_key = self._parse(disk_key)
        return open_below(self.root, PurePosixPath(vm_uuid, f"disk-{device_key}.img"), capacity)
