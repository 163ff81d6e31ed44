"""The :class:`streams.lifecycle.SnapshotRemover` for vSphere (through the pyvmomi adapter)."""

from __future__ import annotations

from cbtstream.config import VSphereSettings
from cbtstream.vsphere.adapter import VSphereClient
from cbtstream.vsphere.errors import VSphereNotFound


class VSphereSnapshotRemover:
    """Removes VM snapshots; connects on first use (Faust owns the event loop) and treats an
    already removed snapshot as removed."""

    def __init__(self, settings: VSphereSettings) -> None:
        self._client = VSphereClient(settings)
        self._started = False

    async def remove(self, vm_instance_uuid: str, vm_snapshot: str) -> None:
        if not self._started:
            await self._client.start()
            self._started = True
        try:
            await self._client.remove_vm_snapshot(vm_instance_uuid, vm_snapshot)
        except VSphereNotFound:
            return

    async def stop(self) -> None:
        if self._started:
            self._started = False
            await self._client.stop()
