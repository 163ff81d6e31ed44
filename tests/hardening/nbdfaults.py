"""A faulty NBD source for the copier: one ``nbdkit`` of ours (filters ``error`` and ``delay``)
serving copies of the simulator's frozen snapshot images, and the :class:`ExportResolver` that
points the copier at it. The fault is switched on and off with nbdkit's trigger file; the
server can be killed and restarted on the same port (connection loss)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

from cbtstream.vsphere.simctl import SimulatorControl
from consumers.exports import Export
from schemas.disk import DiskRef
from tests.support import free_port


class FaultyNbd:
    """``nbdkit -r file dir=<dir>`` on 127.0.0.1 with read errors (EIO) while ``fail`` is on
    and ``read_delay`` per read."""

    def __init__(self, workdir: Path, *, read_delay: str = "2ms") -> None:
        self.dir = workdir / "exports"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.trigger = workdir / "fail-reads"
        self.port = free_port()
        self.read_delay = read_delay
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        nbdkit = shutil.which("nbdkit")
        assert nbdkit is not None, "nbdkit is not installed"
        self._proc = subprocess.Popen(
            [nbdkit, "--exit-with-parent", "-f", "-r", "-i", "127.0.0.1", "-p", str(self.port),
             "--filter=error", "--filter=delay", "file", f"dir={self.dir}",
             "error-pread=EIO", "error-pread-rate=100%", f"error-pread-file={self.trigger}",
             f"rdelay={self.read_delay}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            if self._proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("nbdkit did not start")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL: every open connection breaks at once."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            self._proc.wait(10)

    def fail(self, on: bool) -> None:
        if on:
            self.trigger.touch()
        else:
            self.trigger.unlink(missing_ok=True)


class FaultyExports:
    """ExportResolver: the simulator's export of (disk, snapshot), copied into ``nbd``'s dir."""

    def __init__(self, control: SimulatorControl, frozen: Path, nbd: FaultyNbd) -> None:
        self.control = control
        self.frozen = frozen
        self.nbd = nbd

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    @contextlib.asynccontextmanager
    async def export(self, disk: DiskRef, vm_snapshot: str) -> AsyncIterator[Export]:
        yield Export(await self.nbd_uri(disk, vm_snapshot))

    async def nbd_uri(self, disk: DiskRef, vm_snapshot: str) -> str:
        export = await asyncio.to_thread(self.control.export, vm_snapshot, disk.device_key)
        dest = self.nbd.dir / export.export
        if not dest.exists():
            tmp = dest.with_suffix(".part")
            await asyncio.to_thread(subprocess.run, ["cp", "--sparse=always",
                                                     str(self.frozen / export.export), str(tmp)],
                                    check=True)
            tmp.rename(dest)
        return f"nbd://127.0.0.1:{self.nbd.port}/{export.export}"
