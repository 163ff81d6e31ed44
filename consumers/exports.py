"""Where the copier reads a snapshot disk: (disk, VM snapshot) -> an NBD export, held for the
duration of one copy.

:meth:`ExportResolver.export` is an async context manager: entering it makes the export exist
(and yields its URI), leaving it - the sync ended, failed or was cancelled - releases whatever
was started for it. The copier checks the URI's endpoint against its own allow-list
(``copier.nbd_allow``); the resolver is not trusted for that.

* :class:`SimulatorExports` (``copier.exports = "simulator"``) asks the simulator's side
  channel, where one read-only ``nbdkit file dir=`` serves every frozen snapshot image under
  its own export name; nothing to release.
* :class:`consumers.vddk.exports.VddkExports` (``"vddk"``, production) starts one
  ``nbdkit vddk`` per (disk, VM snapshot) and stops it on exit.

:func:`build_exports` and :func:`open_exports` are the one place that chooses between them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from cbtstream.vsphere.simctl import SimulatorControl, SimulatorError
from schemas.disk import DiskRef

if TYPE_CHECKING:
    from cbtstream.config import Settings
    from cbtstream.vsphere.adapter import VSphereClient


class ExportNotFound(SimulatorError):
    """No export exists for this (disk, snapshot): the snapshot is gone or the disk is not in it."""

    reason = "export_not_found"


@dataclass(frozen=True)
class Export:
    """One disk of one VM snapshot, served read-only over NBD while the export is held."""

    uri: str
    #: Most NBD connections the export should get (None: as many as the copier likes).
    #: A VDDK export takes one: each connection is a VDDK session.
    max_connections: int | None = None

    def connections(self, wanted: int) -> int:
        return wanted if self.max_connections is None else max(1, min(wanted,
                                                                      self.max_connections))


class ExportResolver(Protocol):
    """Serves one disk of one VM snapshot over NBD for as long as the context is held."""

    async def start(self) -> None:
        """Check the resolver can work at all (called once, at copier start-up)."""
        ...

    async def stop(self) -> None:
        """Release everything still held (safe to call twice)."""
        ...

    def export(self, disk: DiskRef, vm_snapshot: str) -> AbstractAsyncContextManager[Export]:
        """``async with resolver.export(disk, snap) as e:`` read ``e.uri``."""
        ...


class SimulatorExports:
    """:class:`ExportResolver` of the simulator (vcsim-cbt): asks its side channel."""

    def __init__(self, control: SimulatorControl) -> None:
        self._control = control

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    @contextlib.asynccontextmanager
    async def export(self, disk: DiskRef, vm_snapshot: str) -> AsyncIterator[Export]:
        yield Export(await self.nbd_uri(disk, vm_snapshot))

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


def build_exports(settings: Settings, client: VSphereClient) -> ExportResolver:
    """The configured resolver (``copier.exports``), sharing the caller's vSphere client."""
    if settings.copier.exports == "vddk":
        from consumers.vddk.exports import VddkExports

        return VddkExports(settings, client)
    control = SimulatorControl.from_state(settings.stack.dir.resolve() / "vcsim")
    return SimulatorExports(control)


@contextlib.asynccontextmanager
async def open_exports(settings: Settings) -> AsyncIterator[ExportResolver]:
    """The configured resolver, started, with a vSphere client of its own when it needs one
    (for commands such as ``cbtstream verify --source``)."""
    async with contextlib.AsyncExitStack() as stack:
        if settings.copier.exports == "vddk":
            from cbtstream.vsphere.adapter import VSphereClient

            client = await stack.enter_async_context(VSphereClient(settings.vsphere))
            resolver = build_exports(settings, client)
        else:
            resolver = SimulatorExports(
                SimulatorControl.from_state(settings.stack.dir.resolve() / "vcsim"))
        await resolver.start()
        stack.push_async_callback(resolver.stop)
        yield resolver
