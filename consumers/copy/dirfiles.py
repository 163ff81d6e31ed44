"""Small files kept beside a replica (its record, hash tree files, resume checkpoints), read and
written relative to a directory descriptor opened with ``O_NOFOLLOW``, so a symlink planted in
place of the directory or a file is never followed. Writes are atomic: temp file -> fsync ->
rename -> fsync of the directory, so a crash leaves the old or the new file, never a mix.

Used by ``consumers/replica/store.py`` (records and trees) and ``consumers/copy/checkpoint.py``.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def open_dir(directory: Path, create: bool) -> int:
    """A descriptor of ``directory`` (made, mode 0750, when ``create``); the caller closes it."""
    if create:
        directory.mkdir(parents=True, exist_ok=True, mode=0o750)
    return os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)


def read_file(dir_fd: int, name: str, limit: int) -> bytes:
    """The whole file ``name``; ``ValueError`` if it is larger than ``limit`` bytes."""
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        chunks, total = [], 0
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise ValueError(f"{name} is larger than {limit} bytes")
        return b"".join(chunks)
    finally:
        os.close(fd)


def write_atomic(dir_fd: int, name: str, data: bytes | bytearray) -> None:
    """Replace ``name`` with ``data``, durable when this returns (a failed write leaves no temp
    file behind)."""
    tmp = f".{name}.tmp{os.getpid()}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o640, dir_fd=dir_fd)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
    os.fsync(dir_fd)


def unlink_synced(directory: Path, name: str) -> None:
    """Remove ``name`` from ``directory`` durably; a missing file or directory is fine."""
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        dir_fd = open_dir(directory, create=False)
        try:
            os.unlink(name, dir_fd=dir_fd)
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
