"""Client of the simulator's side channel (``/cbt/...`` on vcsim-cbt's HTTPS port).

The side channel exists only in the simulator (devstack/vcsim): it plays the guest (writes and
reads disk data, VMware Tools and its answer to a shutdown), the administrator (VMs with several
disks on several controllers and NICs, add/resize disks, fault injection)
and tells where each snapshot disk is exported over NBD. Tests and the demo use it; production
code never does. Calls are blocking (``urllib``); async callers wrap them in
``asyncio.to_thread``.
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from cbtstream.errors import CbtStreamError

#: One PUT carries at most this much guest data (the simulator's limit is 64 MiB).
_WRITE_CHUNK = 16 * 1024 * 1024


class SimulatorError(CbtStreamError):
    """The side channel refused a request or did not answer."""

    reason = "simulator_error"


@dataclass(frozen=True)
class SimDisk:
    key: int
    file: str
    uuid: str
    capacity: int
    change_id: str
    disk_mode: str = "persistent"
    rdm: str = ""  # compatibilityMode of an RDM backing (physicalMode, virtualMode), "" if flat


@dataclass(frozen=True)
class SimNic:
    """A NIC to create: govmomi's card name, a network name, and a MAC ("" generates one)."""

    adapter: str = "vmxnet3"
    network: str = "VM Network"
    mac: str = ""


@dataclass(frozen=True)
class SimVm:
    moref: str
    name: str
    instance_uuid: str
    path: str
    cbt: bool
    disks: tuple[SimDisk, ...]
    #: A CBT switch (ReconfigVM changeTrackingEnabled) waits for the VM's next stun.
    cbt_pending: bool = False

    def disk(self, key: int) -> SimDisk:
        for d in self.disks:
            if d.key == key:
                return d
        raise KeyError(key)


@dataclass(frozen=True)
class SimExport:
    uri: str
    export: str
    capacity: int
    change_id: str


def _vm(doc: dict[str, Any]) -> SimVm:
    return SimVm(
        moref=doc["moref"], name=doc["name"], instance_uuid=doc["instance_uuid"],
        path=doc["path"], cbt=doc["cbt"], cbt_pending=bool(doc.get("cbt_pending")),
        disks=tuple(SimDisk(d["key"], d["file"], d["uuid"], d["capacity"], d["change_id"],
                            d.get("disk_mode") or "persistent", d.get("rdm") or "")
                    for d in doc.get("disks") or []),
    )


class SimulatorControl:
    """``SimulatorControl("https://127.0.0.1:18989/cbt", cafile=...)``."""

    def __init__(self, base_url: str, *, cafile: Path | None = None, insecure: bool = False,
                 timeout: float = 30.0) -> None:
        self._base = base_url.rstrip("/")
        self._timeout = timeout
        self._ctx: ssl.SSLContext | None = None
        if self._base.startswith("https:"):
            self._ctx = ssl.create_default_context(cafile=str(cafile) if cafile else None)
            if insecure:
                self._ctx.check_hostname = False
                self._ctx.verify_mode = ssl.CERT_NONE

    @classmethod
    def from_state(cls, data_dir: Path) -> SimulatorControl:
        """Connect to the simulator whose ``vcsim.json`` is in ``data_dir``."""
        info = json.loads((data_dir / "vcsim.json").read_text())
        cert = info.get("cert")
        return cls(info["side_channel"], cafile=Path(cert) if cert else None)

    def _request(self, method: str, path: str, body: bytes | None = None,
                 content_type: str = "application/json") -> bytes:
        req = urllib.request.Request(self._base + path, data=body, method=method)
        if body is not None:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, timeout=self._timeout, context=self._ctx) as resp:
                return bytes(resp.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:500]
            raise SimulatorError(f"{method} {path}: HTTP {exc.code} {detail}") from exc
        except OSError as exc:
            raise SimulatorError(f"{method} {path}: {exc}") from exc

    def _json(self, method: str, path: str, doc: Any = None) -> Any:
        body = None if doc is None else json.dumps(doc).encode()
        return json.loads(self._request(method, path, body))

    def create_vm(self, name: str, disk_sizes: list[int], *, cbt: bool = False,
                  power_on: bool = False, disk_controllers: list[str] | None = None,
                  nics: list[SimNic] | None = None, firmware: str = "",
                  secure_boot: bool = False, guest_id: str = "", cpus: int = 0,
                  cores_per_socket: int = 0, memory_mb: int = 0, tools: bool = False) -> SimVm:
        """A VM with one thin disk per size (bytes, multiple of 1 KiB), on one pvscsi
        controller unless ``disk_controllers`` names, per disk, another kind (lsilogic, nvme,
        sata, ide...; one controller per kind); ``nics`` on the inventory's networks (``VM
        Network``, ``DC0_DVPG0``); ``tools``: VMware Tools installed (running while powered
        on). Zero or empty values keep the simulator's defaults (bios, otherGuest, 1 CPU,
        32 MiB)."""
        return _vm(self._json("POST", "/vms", {
            "name": name, "disks": disk_sizes, "cbt": cbt, "power_on": power_on,
            "disk_controllers": disk_controllers or [],
            "nics": [{"adapter": n.adapter, "network": n.network, "mac": n.mac}
                     for n in nics or []],
            "firmware": firmware, "secure_boot": secure_boot, "guest_id": guest_id,
            "cpus": cpus, "cores_per_socket": cores_per_socket, "memory_mb": memory_mb,
            "tools": tools}))

    def set_guest(self, moref: str, *, tools: bool, ignore_shutdown: bool = False,
                  shutdown_delay_ms: int = 0) -> SimVm:
        """How the VM's guest behaves: VMware Tools installed (then running while the VM is
        powered on), and its answer to a guest shutdown: power off after
        ``shutdown_delay_ms``, or nothing at all (``ignore_shutdown``, a hung guest)."""
        return _vm(self._json("POST", f"/vms/{moref}/guest", {
            "tools": tools, "ignore_shutdown": ignore_shutdown,
            "shutdown_delay_ms": shutdown_delay_ms}))

    def vm(self, moref: str) -> SimVm:
        return _vm(self._json("GET", f"/vms/{moref}"))

    def add_disk(self, moref: str, capacity: int) -> SimVm:
        return _vm(self._json("POST", f"/vms/{moref}/disks", {"capacity": capacity}))

    def resize_disk(self, moref: str, key: int, capacity: int) -> SimVm:
        return _vm(self._json("POST", f"/vms/{moref}/disks/{key}/resize", {"capacity": capacity}))

    def reset_disk_cbt(self, moref: str, key: int) -> SimVm:
        """Void one disk's change tracking (new epoch), as ESXi does after a power loss."""
        return _vm(self._json("POST", f"/vms/{moref}/disks/{key}/cbt-reset", {}))

    def set_disk_mode(self, moref: str, key: int, *, disk_mode: str = "",
                      rdm: str = "") -> SimVm:
        """Give a disk another ``diskMode`` (``independent_persistent``...) or an RDM backing
        (``rdm="physical"`` or ``"virtual"``), as an administrator would."""
        return _vm(self._json("POST", f"/vms/{moref}/disks/{key}/mode",
                              {"disk_mode": disk_mode, "rdm": rdm}))

    def set_consolidation_needed(self, moref: str, needed: bool = True) -> None:
        """Set ``runtime.consolidationNeeded`` (left by a snapshot removal that failed)."""
        self._json("POST", f"/vms/{moref}/consolidation-needed", {"needed": needed})

    def write(self, moref: str, key: int, offset: int, data: bytes) -> None:
        """Guest write: stores ``data`` at ``offset`` and marks the 64 KiB blocks changed."""
        for start in range(0, max(len(data), 1), _WRITE_CHUNK):
            chunk = data[start:start + _WRITE_CHUNK]
            q = urlencode({"offset": offset + start})
            self._request("PUT", f"/vms/{moref}/disks/{key}/data?{q}", chunk,
                          "application/octet-stream")

    def read(self, moref: str, key: int, offset: int, length: int) -> bytes:
        """Live (current) content of a disk."""
        q = urlencode({"offset": offset, "length": length})
        return self._request("GET", f"/vms/{moref}/disks/{key}/data?{q}")

    def export(self, snapshot: str, key: int) -> SimExport:
        """Where the frozen image of one snapshot disk is served over NBD."""
        d = self._json("GET", f"/snapshots/{snapshot}/disks/{key}/export")
        return SimExport(d["uri"], d["export"], d["capacity"], d["change_id"])

    def inject_fault(self, method: str, fault: str, *, count: int = 0, obj: str = "*",
                     delay_ms: int = 0) -> None:
        """Make ``method`` (e.g. ``QueryChangedDiskAreas``) fail with ``fault`` (timeout, network,
        invalid_state, not_authenticated, no_permission, ...) ``count`` times (0: until
        cleared)."""
        self._json("POST", "/faults", {"method": method, "fault": fault, "count": count,
                                       "object": obj, "delay_ms": delay_ms})

    def clear_faults(self) -> None:
        self._json("DELETE", "/faults")
