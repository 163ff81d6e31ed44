"""Where the copier reads a snapshot disk: (disk, VM snapshot) -> NBD URI.

This is the extension point for production: a resolver for real vSphere would start
``nbdkit vddk`` for the snapshot's disk (``libdir=... server=... vm=moref=<vm> snapshot=<moref>
file=<backing file> thumbprint=...``) on a local port, or ask a service that does, and return
its ``nbd://host:port/export``. The copier checks the returned ``host:port`` against its own
allow-list; the resolver is not trusted for that.

:class:`SimulatorExports` asks the simulator's side channel, where one read-only
``nbdkit file dir=`` serves every frozen snapshot image under its own export name.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from cbtstream.vsphere.simctl import SimulatorControl, SimulatorError
from schemas.disk import DiskRef


class ExportNotFound(SimulatorError):
    """No export exists for this (disk, snapshot): the snapshot is gone or the disk is not in it."""

    reason = "export_not_found"


class ExportResolver(Protocol):
    """Resolves the NBD URI of one disk of one VM snapshot."""

    async def nbd_uri(self, disk: DiskRef, vm_snapshot: str) -> str:
        """``nbd://HOST:PORT/EXPORTNAME`` serving the disk as of the snapshot, read-only."""
        ...


class SimulatorExports:
    """:class:`ExportResolver` of the simulator (vcsim-cbt): asks its side channel."""

    def __init__(self, control: SimulatorControl) -> None:
        self._control = control

    async def nbd_uri(self, disk: DiskRef, vm_snapshot: str) -> str:
        try:
            export = await asyncio.to_thread(self._control.export, vm_snapshot, disk.device_key)
        except SimulatorError as exc:
            if "HTTP 404" in str(exc):
                raise ExportNotFound(
                    f"no NBD export for {disk.key} in snapshot {vm_snapshot}"
                ) from exc
            raise
        if export.capacity != disk.capacity_bytes:
            raise ExportNotFound(
                f"export of {disk.key} in {vm_snapshot} has {export.capacity} bytes, "
                f"the disk {disk.capacity_bytes}: not the same disk"
            )
        return export.uri
