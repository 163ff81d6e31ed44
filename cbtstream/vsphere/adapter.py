"""The vSphere adapter: the only module that imports pyvmomi.

pyvmomi is blocking, so every SOAP call runs on a small thread pool owned by the client, never on
the event loop; task completion is polled with ``asyncio.sleep`` between calls, so waiting for a
snapshot occupies no thread. Properties are read through the PropertyCollector with explicit
paths (``config.hardware.device``, ``snapshot.rootSnapshotList``): lazy attribute reads of unset
properties fail on the simulator and cost one round trip each on a real vCenter.

Change IDs are read from the **snapshot's** config (``snapshot.config.hardware.device[i].backing
.changeId``), never from the live VM, and always returned together with the :class:`DiskRef` of
the disk they belong to. pyvmomi faults become :mod:`cbtstream.vsphere.errors` with
``raise ... from``.

TLS: certificates are verified by default (system trust store, or ``settings.cafile``); only
``settings.insecure=True`` turns verification off.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http.client
import ssl
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import urlsplit

from pyVim.connect import Disconnect, SmartStubAdapter
from pyVmomi import vim as _vim
from pyVmomi import vmodl as _vmodl

from cbtstream.config import VSphereSettings
from cbtstream.extents import Extent
from cbtstream.vsphere.description import VM_PATHS, DeviceClass, VmPlace, describe
from cbtstream.vsphere.errors import (
    CANNOT_GET_CHANGES_KEY,
    NO_TRACK_KEY,
    CbtNotEnabled,
    GuestShutdownTimeout,
    InvalidPowerState,
    StaleChangeId,
    ToolsNotRunning,
    VSphereAuthError,
    VSphereError,
    VSphereInvalidArgument,
    VSphereNotFound,
    VSphereTransient,
)
from schemas.disk import DiskRef, disk_id_for
from schemas.vm import PowerState, VmDescription

T = TypeVar("T")

# pyvmomi's dynamic types (vim.fault.*, vim.vm.ConfigSpec...) are built at run time; its partial
# stubs do not describe them, so we treat the namespaces as dynamic.
vim: Any = _vim
vmodl: Any = _vmodl

#: pyvmomi calls that may run at once (QueryChangedDiskAreas of several disks, task polls).
_THREADS = 4
#: Task polling: start fast (the simulator finishes in milliseconds), back off to this.
_TASK_POLL_MAX_S = 1.0
_TASK_TIMEOUT_S = 1800.0
#: Power state polls while a guest shuts down: an OS takes seconds to minutes, and one poll is
#: one cheap PropertyCollector call.
_POWER_POLL_S = 0.5
_TOOLS_RUNNING = "guestToolsRunning"

_TRANSIENT_FAULTS: tuple[type[BaseException], ...] = (
    vmodl.fault.SystemError,
    vmodl.fault.HostCommunication,
    vmodl.fault.RequestCanceled,
    vim.fault.Timedout,
    vim.fault.InvalidState,
    vim.fault.TaskInProgress,
)
_AUTH_FAULTS: tuple[type[BaseException], ...] = (
    vim.fault.InvalidLogin,
    vim.fault.NotAuthenticated,
    vim.fault.NoPermission,
)


@dataclass(frozen=True)
class VmRef:
    """A VM as found in the inventory: its moref on this vCenter and its stable identity."""

    moref: str
    name: str
    instance_uuid: str
    path: str


@dataclass(frozen=True)
class HostRef:
    """The ESXi host a VM runs on: its moref, name (what VDDK connects to directly) and the
    SHA-1 thumbprint of its certificate as vCenter records it (``summary.config.sslThumbprint``,
    trusted because it was read over the verified vCenter session)."""

    moref: str
    name: str
    thumbprint: str


@dataclass(frozen=True)
class SnapshotInfo:
    """One VM snapshot and, per disk, the disk's identity and change ID as of the snapshot.

    ``disks`` are the disks the snapshot captured; ``skipped`` the VM's disks it did not
    (independent disks, physical RDMs: see :func:`skip_reason`), with the reason."""

    moref: str
    name: str
    created: datetime
    vm: VmRef
    quiesced: bool
    disks: list[tuple[DiskRef, str | None]]
    skipped: list[tuple[DiskRef, str]] = field(default_factory=list)


@dataclass(frozen=True)
class CbtStatus:
    """Change tracking of one VM: what its config asks for (``enabled``) and whether it is in
    effect (``active``: every disk a snapshot captures has a ``backing.changeId`` in the live
    config). Enabled but not active means the switch waits for the VM's next stun."""

    vm: VmRef
    enabled: bool
    active: bool


@dataclass(frozen=True)
class VmSnapshot:
    """One node of a VM's snapshot tree, as listed for orphan hunting."""

    vm: VmRef
    moref: str
    name: str
    description: str
    created: datetime


@dataclass(frozen=True)
class VmSnapshots:
    """A VM, every snapshot in its tree, and ``runtime.consolidationNeeded``."""

    vm: VmRef
    snapshots: list[VmSnapshot]
    consolidation_needed: bool


@dataclass(frozen=True)
class InventoryVm:
    """A VM as the site scheduler sees it: where it sits (folder, host, cluster) and the
    snapshots it has now."""

    vm: VmRef
    #: Inventory path of the folder holding the VM (``/DC/vm/prod``).
    folder: str
    #: The ESXi host it runs on (``runtime.host``), "" if none.
    host: str
    #: Its cluster's name, None on a standalone host.
    cluster: str | None
    snapshots: tuple[VmSnapshot, ...]


@dataclass(frozen=True)
class Inventory:
    """The VMs of a vCenter, and every folder path and cluster name (so a selector naming a
    folder or cluster that holds no VM is told from one that does not exist)."""

    vms: tuple[InventoryVm, ...]
    folders: frozenset[str]
    clusters: frozenset[str]


def _fault_keys(fault: Any) -> set[str]:
    return {m.key for m in (getattr(fault, "faultMessage", None) or []) if getattr(m, "key", None)}


def translate(exc: BaseException, what: str = "") -> VSphereError:
    """Map a pyvmomi fault (raised, or a task's ``info.error``) or an I/O error to our errors."""
    msg = getattr(exc, "msg", None) or str(exc) or type(exc).__name__
    text = f"{what}: {msg}" if what else msg
    keys = _fault_keys(exc)
    if CANNOT_GET_CHANGES_KEY in keys:
        return StaleChangeId(text)
    if NO_TRACK_KEY in keys:
        return CbtNotEnabled(text)
    if isinstance(exc, vim.fault.ToolsUnavailable):
        return ToolsNotRunning(text)
    if isinstance(exc, (vim.fault.NotFound, vmodl.fault.ManagedObjectNotFound)):
        return VSphereNotFound(text)
    if isinstance(exc, vmodl.fault.InvalidArgument):
        return VSphereInvalidArgument(text)
    if isinstance(exc, _AUTH_FAULTS):
        return VSphereAuthError(text)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return VSphereAuthError(f"{what}: TLS certificate not trusted ({exc.verify_message}); "
                                "set vsphere.cafile, or vsphere.insecure=true for a lab")
    if isinstance(exc, (*_TRANSIENT_FAULTS, OSError, http.client.HTTPException)):
        return VSphereTransient(text)
    return VSphereError(text)


def _ssl_context(settings: VSphereSettings) -> ssl.SSLContext | None:
    if settings.insecure:
        return None
    return ssl.create_default_context(cafile=str(settings.cafile) if settings.cafile else None)


class VSphereClient:
    """An async client of one vCenter/ESXi. ``async with VSphereClient(settings) as c: ...``."""

    def __init__(self, settings: VSphereSettings) -> None:
        self._settings = settings
        parts = urlsplit(settings.url)
        if parts.scheme != "https" or not parts.hostname:
            raise VSphereInvalidArgument(f"vsphere.url must be https://host[:port]/sdk: "
                                         f"{settings.url!r}")
        self._host = parts.hostname
        self._port = parts.port or 443
        self._path = parts.path or "/sdk"
        self._si: Any = None
        self._executor: ThreadPoolExecutor | None = None

    @property
    def vcenter(self) -> str:
        """Identity of the endpoint for events: ``host[:port]`` (never credentials)."""
        return self._host if self._port == 443 else f"{self._host}:{self._port}"

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._si is not None:
            return
        self._executor = ThreadPoolExecutor(_THREADS, thread_name_prefix="pyvmomi")
        try:
            self._si = await self._call(self._connect, what="connect")
        except BaseException:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise

    def _connect(self) -> Any:
        # SmartStubAdapter + Login rather than SmartConnect: no process-global "current" service
        # instance, and a failed login drops the stub's sockets instead of leaking them.
        s = self._settings
        stub = SmartStubAdapter(  # type: ignore[no-untyped-call]
            host=self._host,
            port=self._port,
            path=self._path,
            sslContext=_ssl_context(s),
            disableSslCertValidation=s.insecure,
            httpConnectionTimeout=60,
        )
        si = vim.ServiceInstance("ServiceInstance", stub)
        try:
            si.RetrieveContent().sessionManager.Login(s.username, s.password.get_secret_value())
        except BaseException:
            stub.DropConnections()
            raise
        return si

    async def stop(self) -> None:
        si, executor = self._si, self._executor
        self._si, self._executor = None, None
        if executor is None:
            return
        if si is not None:
            loop = asyncio.get_running_loop()
            # Logout is best effort: the session expires on the server anyway.
            with contextlib.suppress(Exception):
                await loop.run_in_executor(executor, Disconnect, si)
        executor.shutdown(wait=False)

    async def __aenter__(self) -> VSphereClient:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- plumbing -------------------------------------------------------------------------------
    async def _call(self, fn: Callable[..., T], *args: Any, what: str = "", **kw: Any) -> T:
        if self._executor is None:
            raise VSphereError("VSphereClient is not started")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kw))
        except (vmodl.MethodFault, OSError, http.client.HTTPException, TimeoutError) as exc:
            raise translate(exc, what) from exc

    @property
    def _stub(self) -> Any:
        if self._si is None:
            raise VSphereError("VSphereClient is not started")
        return self._si._stub

    def _vm(self, vm: VmRef) -> Any:
        return vim.VirtualMachine(vm.moref, self._stub)

    def _snapshot(self, moref: str) -> Any:
        return vim.vm.Snapshot(moref, self._stub)

    def _props(self, obj: Any, paths: list[str]) -> dict[str, Any]:
        """Read ``paths`` of one managed object with a single PropertyCollector call."""
        pc = vmodl.query.PropertyCollector
        spec = pc.FilterSpec(
            objectSet=[pc.ObjectSpec(obj=obj, skip=False)],
            propSet=[pc.PropertySpec(type=type(obj), pathSet=paths, all=False)],
        )
        result = self._si.content.propertyCollector.RetrieveContents([spec])
        if not result:
            raise vmodl.fault.ManagedObjectNotFound(obj=obj)
        content = result[0]
        for missing in getattr(content, "missingSet", None) or []:
            fault = missing.fault
            if isinstance(fault, vmodl.fault.ManagedObjectNotFound):
                raise fault
        return {p.name: p.val for p in content.propSet or []}

    async def _wait(self, task: Any, what: str) -> Any:
        delay, waited = 0.02, 0.0
        while waited < _TASK_TIMEOUT_S:
            info = await self._call(self._props, task, ["info.state", "info.error", "info.result"],
                                    what=what)
            state = info.get("info.state")
            if state == vim.TaskInfo.State.success:
                return info.get("info.result")
            if state == vim.TaskInfo.State.error:
                error = info.get("info.error")
                if isinstance(error, BaseException):
                    raise translate(error, what) from error
                raise VSphereError(f"{what}: task failed without a fault")
            await asyncio.sleep(delay)
            waited += delay
            delay = min(delay * 2, _TASK_POLL_MAX_S)
        raise VSphereTransient(f"{what}: task not finished after {_TASK_TIMEOUT_S:.0f}s")

    def _inventory_path(self, obj: Any) -> str:
        names: list[str] = []
        while obj is not None:
            props = self._props(obj, ["name", "parent"])
            parent = props.get("parent")
            if parent is None:  # the root folder is not part of inventory paths
                break
            names.append(props["name"])
            obj = parent
        return "/" + "/".join(reversed(names))

    # -- VMs ------------------------------------------------------------------------------------
    async def find_vm(self, *, instance_uuid: str | None = None, path: str | None = None) -> VmRef:
        """Find a VM by ``config.instanceUuid`` or by inventory path (``/DC/vm/name``)."""
        if (instance_uuid is None) == (path is None):
            raise VSphereInvalidArgument("give exactly one of instance_uuid or path")
        return await self._call(self._find_vm, instance_uuid, path,
                                what=f"find VM {instance_uuid or path}")

    def _find_vm(self, instance_uuid: str | None, path: str | None) -> VmRef:
        index = self._si.content.searchIndex
        if instance_uuid is not None:
            obj = index.FindByUuid(None, instance_uuid, True, True)
        else:
            obj = index.FindByInventoryPath((path or "").lstrip("/"))
        if obj is None or not isinstance(obj, vim.VirtualMachine):
            raise VSphereNotFound(f"no VM with {'instance uuid' if instance_uuid else 'path'} "
                                  f"{instance_uuid or path}")
        props = self._props(obj, ["name", "config.instanceUuid"])
        return VmRef(
            moref=obj._moId,
            name=props["name"],
            instance_uuid=str(props["config.instanceUuid"]).lower(),
            path=self._inventory_path(obj),
        )

    async def _reconfigure(self, vm: VmRef, spec: Any, what: str) -> None:
        task = await self._call(self._vm(vm).ReconfigVM_Task, spec, what=what)
        await self._wait(task, what)

    async def enable_cbt(self, vm: VmRef) -> None:
        """Turn change tracking on (ESXi applies it at the next stun, e.g. the next snapshot)."""
        await self._reconfigure(vm, vim.vm.ConfigSpec(changeTrackingEnabled=True),
                                f"enable CBT on {vm.path}")

    async def disable_cbt(self, vm: VmRef) -> None:
        """Turn change tracking off; re-enabling starts a new epoch (old change IDs are void)."""
        await self._reconfigure(vm, vim.vm.ConfigSpec(changeTrackingEnabled=False),
                                f"disable CBT on {vm.path}")

    async def cbt_enabled(self, vm: VmRef) -> bool:
        """What the VM's config asks for (``config.changeTrackingEnabled``), not whether it is in
        effect yet (see :meth:`cbt_status`)."""
        props = await self._call(self._props, self._vm(vm), ["config.changeTrackingEnabled"],
                                 what=f"read {vm.path}")
        return bool(props.get("config.changeTrackingEnabled"))

    async def cbt_status(self, vm: VmRef) -> CbtStatus:
        """Whether CBT is asked for and whether it is in effect on every captured disk."""
        return await self._call(self._cbt_status, vm, what=f"read CBT of {vm.path}")

    def _cbt_status(self, vm: VmRef) -> CbtStatus:
        props = self._props(self._vm(vm), ["config.changeTrackingEnabled",
                                           "config.hardware.device"])
        disks = [d for d in props.get("config.hardware.device") or []
                 if isinstance(d, vim.vm.device.VirtualDisk) and skip_reason(d) is None]
        enabled = bool(props.get("config.changeTrackingEnabled"))
        active = enabled and all(
            getattr(d.backing, "changeId", None) for d in disks)
        return CbtStatus(vm=vm, enabled=enabled, active=active)

    async def vm_host(self, vm: VmRef) -> HostRef:
        """The host the VM is registered on (``runtime.host``)."""
        return await self._call(self._vm_host, vm, what=f"read host of {vm.path}")

    def _vm_host(self, vm: VmRef) -> HostRef:
        host = self._props(self._vm(vm), ["runtime.host"]).get("runtime.host")
        if host is None:
            raise VSphereNotFound(f"{vm.path} has no runtime.host")
        props = self._props(host, ["name", "summary.config.sslThumbprint"])
        return HostRef(moref=host._moId, name=str(props.get("name") or ""),
                       thumbprint=str(props.get("summary.config.sslThumbprint") or "").upper())

    # -- description and power ------------------------------------------------------------------
    async def describe_vm(self, vm: VmRef) -> VmDescription:
        """The VM's description for a target platform (:mod:`schemas.vm`): firmware, CPUs,
        memory, guest OS, disks in controller order, NICs with MAC and network, read now."""
        return await self._call(self._describe_vm, vm, what=f"describe {vm.path}")

    def _describe_vm(self, vm: VmRef) -> VmDescription:
        obj = self._vm(vm)
        props = self._props(obj, [*VM_PATHS, "network", "runtime.host"])
        networks: dict[str, str] = {}
        for net in props.get("network") or []:
            # A distributed portgroup is named in NIC backings by its key, an opaque network by
            # its id; a standard network by its name already.
            if isinstance(net, vim.dvs.DistributedVirtualPortgroup):
                found = self._props(net, ["name", "key"])
                networks[str(found.get("key") or net._moId)] = str(found.get("name") or "")
            elif isinstance(net, vim.OpaqueNetwork):
                found = self._props(net, ["name", "summary"])
                summary = found.get("summary")
                net_id = getattr(summary, "opaqueNetworkId", None) or net._moId
                networks[str(net_id)] = str(found.get("name") or "")
        host = props.get("runtime.host")
        host_name = str(self._props(host, ["name"]).get("name") or "") if host else None
        devices = [(cls, d) for d in props.get("config.hardware.device") or []
                   if (cls := _classify(d)) is not None]
        return describe(props, devices, VmPlace(vm.path, self.vcenter, host_name), networks)

    async def power_state(self, vm: VmRef) -> PowerState:
        """``runtime.powerState``: poweredOn, poweredOff or suspended."""
        props = await self._call(self._props, self._vm(vm), ["runtime.powerState"],
                                 what=f"read power state of {vm.path}")
        return str(props.get("runtime.powerState"))  # type: ignore[return-value]

    async def power_off(self, vm: VmRef) -> None:
        """Power the VM off at once (PowerOffVM_Task: no guest involvement, like pulling the
        plug). A VM already powered off is left as it is."""
        if await self.power_state(vm) == "poweredOff":
            return
        what = f"power off {vm.path}"
        task = await self._call(self._vm(vm).PowerOffVM_Task, what=what)
        await self._wait(task, what)

    async def power_on(self, vm: VmRef) -> None:
        """Power the VM on (PowerOnVM_Task); a VM already powered on is left as it is."""
        if await self.power_state(vm) == "poweredOn":
            return
        what = f"power on {vm.path}"
        task = await self._call(self._vm(vm).PowerOnVM_Task, what=what)
        await self._wait(task, what)

    async def shutdown_guest(self, vm: VmRef, timeout_s: float) -> None:
        """Ask the guest OS to shut down through VMware Tools (ShutdownGuest), then wait until
        the VM is powered off.

        A VM already powered off is left as it is. Refused with :class:`ToolsNotRunning` when
        ``guest.toolsRunningStatus`` is not guestToolsRunning (before asking, and if vSphere
        answers ToolsUnavailable), with :class:`InvalidPowerState` for a suspended VM;
        :class:`GuestShutdownTimeout` when the VM is still on after ``timeout_s`` (the guest
        may still be shutting down: nothing is forced).
        """
        if timeout_s <= 0:
            raise VSphereInvalidArgument(f"shutdown timeout must be positive: {timeout_s}")
        what = f"guest shutdown of {vm.path}"
        props = await self._call(self._props, self._vm(vm),
                                 ["runtime.powerState", "guest.toolsRunningStatus"], what=what)
        state = str(props.get("runtime.powerState"))
        if state == "poweredOff":
            return
        if state != "poweredOn":
            raise InvalidPowerState(f"{what}: the VM is {state}, not poweredOn")
        tools = str(props.get("guest.toolsRunningStatus") or "unknown")
        if tools != _TOOLS_RUNNING:
            raise ToolsNotRunning(f"{what}: VMware Tools is not running in the guest ({tools}); "
                                  "power the VM off instead, or start the tools")
        await self._call(self._vm(vm).ShutdownGuest, what=what)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            state = await self.power_state(vm)
            if state == "poweredOff":
                return
            left = deadline - loop.time()
            if left <= 0:
                raise GuestShutdownTimeout(
                    f"{what}: still {state} {timeout_s:g}s after the guest was asked to shut "
                    "down; power it off instead, or allow more time")
            await asyncio.sleep(min(_POWER_POLL_S, left))

    # -- snapshots ------------------------------------------------------------------------------
    async def create_snapshot(
        self, vm: VmRef, name: str, *, quiesce: bool = False, description: str = ""
    ) -> SnapshotInfo:
        """Take ONE snapshot of all the VM's disks (crash-consistent across disks, or quiesced)
        and return each disk's identity and change ID from the snapshot's config."""
        what = f"snapshot {vm.path}"
        task = await self._call(
            self._vm(vm).CreateSnapshot_Task, name=name, description=description, memory=False,
            quiesce=quiesce, what=what,
        )
        snap = await self._wait(task, what)
        return await self.snapshot_info(vm, snap._moId)

    async def snapshot_info(self, vm: VmRef, moref: str) -> SnapshotInfo:
        return await self._call(self._snapshot_info, vm, moref, what=f"read snapshot {moref}")

    def _snapshot_info(self, vm: VmRef, moref: str) -> SnapshotInfo:
        props = self._props(self._snapshot(moref), ["vm", "config.hardware.device"])
        owner = props.get("vm")
        if owner is None or owner._moId != vm.moref:
            raise VSphereInvalidArgument(f"snapshot {moref} does not belong to VM {vm.moref}")
        tree = self._props(self._vm(vm), ["snapshot.rootSnapshotList"])
        node = _find_in_tree(tree.get("snapshot.rootSnapshotList") or [], moref)
        if node is None:
            raise VSphereNotFound(f"snapshot {moref} not in the snapshot tree of {vm.path}")
        disks: list[tuple[DiskRef, str | None]] = []
        skipped: list[tuple[DiskRef, str]] = []
        for device in props.get("config.hardware.device") or []:
            if not isinstance(device, vim.vm.device.VirtualDisk):
                continue
            ref, change_id = _disk(vm, device)
            reason = skip_reason(device)
            if reason is None:
                disks.append((ref, change_id))
            else:
                skipped.append((ref, reason))
        return SnapshotInfo(moref=moref, name=node.name, created=_aware(node.createTime), vm=vm,
                            quiesced=bool(node.quiesced), disks=disks, skipped=skipped)

    async def remove_snapshot(self, vm: VmRef, moref: str) -> None:
        what = f"remove snapshot {moref} of {vm.path}"
        task = await self._call(self._snapshot(moref).RemoveSnapshot_Task, removeChildren=False,
                                what=what)
        await self._wait(task, what)

    async def remove_vm_snapshot(self, instance_uuid: str, moref: str) -> None:
        """Remove snapshot ``moref`` of the VM whose ``config.instanceUuid`` is ``instance_uuid``
        (the snapshot lifecycle's call: a handful of round trips, no inventory path walk).
        :class:`VSphereNotFound` when the VM or the snapshot is gone;
        :class:`VSphereInvalidArgument` when the snapshot is another VM's, so an event naming
        a foreign snapshot removes nothing."""
        what = f"remove snapshot {moref} of VM {instance_uuid}"
        await self._call(self._owned_snapshot, instance_uuid, moref, what=what)
        task = await self._call(self._snapshot(moref).RemoveSnapshot_Task, removeChildren=False,
                                what=what)
        await self._wait(task, what)

    def _owned_snapshot(self, instance_uuid: str, moref: str) -> None:
        vm = self._si.content.searchIndex.FindByUuid(None, instance_uuid, True, True)
        if vm is None or not isinstance(vm, vim.VirtualMachine):
            raise VSphereNotFound(f"no VM with instance uuid {instance_uuid}")
        owner = self._props(self._snapshot(moref), ["vm"]).get("vm")
        if owner is None or owner._moId != vm._moId:
            raise VSphereInvalidArgument(
                f"snapshot {moref} is not a snapshot of VM {instance_uuid}")

    async def list_snapshots(self) -> list[VmSnapshots]:
        """Every VM of the inventory with its snapshot tree and ``runtime.consolidationNeeded``
        (one PropertyCollector call over a container view)."""
        return await self._call(self._list_snapshots, what="list snapshots")

    def _list_snapshots(self) -> list[VmSnapshots]:
        content = self._si.content
        view = content.viewManager.CreateContainerView(content.rootFolder,
                                                       [vim.VirtualMachine], True)
        try:
            pc = vmodl.query.PropertyCollector
            spec = pc.FilterSpec(
                objectSet=[pc.ObjectSpec(obj=view, skip=True, selectSet=[pc.TraversalSpec(
                    name="view", path="view", skip=False, type=vim.view.ContainerView)])],
                propSet=[pc.PropertySpec(type=vim.VirtualMachine, all=False, pathSet=[
                    "name", "config.instanceUuid", "snapshot.rootSnapshotList",
                    "runtime.consolidationNeeded"])],
            )
            result = content.propertyCollector.RetrieveContents([spec]) or []
        finally:
            view.Destroy()
        out: list[VmSnapshots] = []
        for obj in result:
            props = {p.name: p.val for p in obj.propSet or []}
            uuid = props.get("config.instanceUuid")
            if not uuid:  # a VM being created or a template without config
                continue
            ref = VmRef(moref=obj.obj._moId, name=str(props.get("name") or ""),
                        instance_uuid=str(uuid).lower(), path=self._inventory_path(obj.obj))
            nodes: list[VmSnapshot] = []
            _walk_tree(ref, props.get("snapshot.rootSnapshotList") or [], nodes)
            out.append(VmSnapshots(vm=ref, snapshots=nodes, consolidation_needed=bool(
                props.get("runtime.consolidationNeeded"))))
        return out

    async def inventory(self) -> Inventory:
        """Every VM (templates left out) with its folder, host, cluster and snapshots, in three
        PropertyCollector calls whatever the size of the inventory (names and parents of
        folders, datacenters, hosts and compute resources; then the VMs), so a scheduler can
        read it every cycle."""
        return await self._call(self._inventory, what="read the inventory")

    def _view_props(self, types: list[Any], paths: list[str]) -> list[Any]:
        content = self._si.content
        view = content.viewManager.CreateContainerView(content.rootFolder, types, True)
        try:
            pc = vmodl.query.PropertyCollector
            spec = pc.FilterSpec(
                objectSet=[pc.ObjectSpec(obj=view, skip=True, selectSet=[pc.TraversalSpec(
                    name="view", path="view", skip=False, type=vim.view.ContainerView)])],
                propSet=[pc.PropertySpec(type=t, all=False, pathSet=paths) for t in types],
            )
            return list(content.propertyCollector.RetrieveContents([spec]) or [])
        finally:
            view.Destroy()

    def _inventory(self) -> Inventory:
        nodes: dict[str, tuple[str, Any, Any]] = {}  # moref -> (name, parent, object)
        for obj in self._view_props([vim.Folder, vim.Datacenter, vim.ComputeResource,
                                     vim.HostSystem], ["name", "parent"]):
            props = {p.name: p.val for p in obj.propSet or []}
            nodes[obj.obj._moId] = (str(props.get("name") or ""), props.get("parent"), obj.obj)

        def path(moref: str) -> str:
            names: list[str] = []
            while moref in nodes:
                name, parent, _ = nodes[moref]
                if parent is None:  # the root folder is not part of inventory paths
                    break
                names.append(name)
                moref = parent._moId
            return "/" + "/".join(reversed(names))

        out: list[InventoryVm] = []
        for obj in self._view_props([vim.VirtualMachine], [
                "name", "config.instanceUuid", "config.template", "parent", "runtime.host",
                "snapshot.rootSnapshotList"]):
            props = {p.name: p.val for p in obj.propSet or []}
            uuid, parent = props.get("config.instanceUuid"), props.get("parent")
            if not uuid or props.get("config.template") or parent is None:
                continue  # being created, a template, or in a vApp (no folder)
            folder = path(parent._moId)
            name = str(props.get("name") or "")
            ref = VmRef(moref=obj.obj._moId, name=name, instance_uuid=str(uuid).lower(),
                        path=f"{folder}/{name}")
            host, cluster = props.get("runtime.host"), None
            host_name = ""
            if host is not None and host._moId in nodes:
                host_name, compute, _ = nodes[host._moId]
                if compute is not None and compute._moId in nodes and isinstance(
                        nodes[compute._moId][2], vim.ClusterComputeResource):
                    cluster = nodes[compute._moId][0]
            snaps: list[VmSnapshot] = []
            _walk_tree(ref, props.get("snapshot.rootSnapshotList") or [], snaps)
            out.append(InventoryVm(vm=ref, folder=folder, host=host_name, cluster=cluster,
                                   snapshots=tuple(snaps)))
        return Inventory(
            vms=tuple(out),
            folders=frozenset(path(m) for m, (_, _, o) in nodes.items()
                              if isinstance(o, vim.Folder)),
            clusters=frozenset(n for n, _, o in nodes.values()
                               if isinstance(o, vim.ClusterComputeResource)))

    async def consolidate_disks(self, vm: VmRef) -> None:
        """ConsolidateVMDisks_Task: merge delta disks a failed snapshot removal left behind."""
        what = f"consolidate disks of {vm.path}"
        task = await self._call(self._vm(vm).ConsolidateVMDisks_Task, what=what)
        await self._wait(task, what)

    # -- changed areas --------------------------------------------------------------------------
    async def changed_areas(
        self, vm: VmRef, snapshot_moref: str, device_key: int, change_id: str, capacity_bytes: int
    ) -> AsyncIterator[Extent]:
        """Yield the areas of a disk changed between ``change_id`` and the snapshot (``"*"``:
        the allocated areas), paging QueryChangedDiskAreas until ``capacity_bytes``.

        Every answer is checked: a page must start where asked, make progress and hold areas
        inside itself and the disk, otherwise the result is not trusted.
        """
        vm_obj, snap = self._vm(vm), self._snapshot(snapshot_moref)
        what = f"QueryChangedDiskAreas {vm.path} {snapshot_moref} disk {device_key}"
        offset = 0
        while offset < capacity_bytes:
            info = await self._call(vm_obj.QueryChangedDiskAreas, snapshot=snap,
                                    deviceKey=device_key, startOffset=offset, changeId=change_id,
                                    what=what)
            page_end = info.startOffset + info.length
            if info.startOffset != offset or page_end <= offset:
                raise VSphereError(f"{what}: page [{info.startOffset}, +{info.length}) makes no "
                                   f"progress from offset {offset}")
            for area in info.changedArea or []:
                if area.length <= 0 or area.start < offset or area.start + area.length > min(
                    page_end, capacity_bytes
                ):
                    raise VSphereError(f"{what}: area [{area.start}, +{area.length}) outside page "
                                       f"[{offset}, {page_end}) or disk of {capacity_bytes}")
                yield Extent(area.start, area.length)
            offset = page_end


def _aware(created: datetime) -> datetime:
    return created if created.tzinfo is not None else created.replace(tzinfo=UTC)


def _walk_tree(vm: VmRef, nodes: list[Any], out: list[VmSnapshot]) -> None:
    for node in nodes:
        out.append(VmSnapshot(vm=vm, moref=node.snapshot._moId, name=node.name or "",
                              description=node.description or "",
                              created=_aware(node.createTime)))
        _walk_tree(vm, node.childSnapshotList or [], out)


#: ``diskMode`` values of disks a snapshot does not capture (they keep changing after it).
_INDEPENDENT_MODES = frozenset({"independent_persistent", "independent_nonpersistent"})


def skip_reason(device: Any) -> str | None:
    """Why a snapshot does not capture this virtual disk, or None if it does.

    Independent disks (``diskMode`` independent_persistent / independent_nonpersistent) are
    excluded from snapshots by definition; a physical-compatibility RDM
    (``VirtualDiskRawDiskMappingVer1BackingInfo`` with ``compatibilityMode`` physicalMode)
    hands SCSI commands to the LUN, so ESXi can neither snapshot it nor track its changes.
    Copying either "from the snapshot" would read a disk that is still being written.
    """
    backing = device.backing
    if isinstance(backing, vim.vm.device.VirtualDisk.RawDiskMappingVer1BackingInfo) and \
            backing.compatibilityMode == "physicalMode":
        return "physical_rdm"
    mode = getattr(backing, "diskMode", None)
    if mode in _INDEPENDENT_MODES:
        return str(mode)
    return None


def _find_in_tree(nodes: list[Any], moref: str) -> Any:
    for node in nodes:
        if node.snapshot._moId == moref:
            return node
        found = _find_in_tree(node.childSnapshotList or [], moref)
        if found is not None:
            return found
    return None


def _disk(vm: VmRef, device: Any) -> tuple[DiskRef, str | None]:
    backing = device.backing
    capacity = device.capacityInBytes or (device.capacityInKB or 0) * 1024
    ref = DiskRef(
        vm_instance_uuid=vm.instance_uuid,
        vm_path=vm.path,
        vm_name=vm.name,
        device_key=device.key,
        disk_id=disk_id_for(device.key),
        backing_uuid=getattr(backing, "uuid", None) or "",
        backing_file=getattr(backing, "fileName", None) or "",
        capacity_bytes=capacity,
    )
    return ref, getattr(backing, "changeId", None) or None


#: pyvmomi device type -> (controller kind, model), most specific first.
_CONTROLLERS: tuple[tuple[str, str, str], ...] = (
    ("ParaVirtualSCSIController", "scsi", "pvscsi"),
    ("VirtualLsiLogicSASController", "scsi", "lsilogic-sas"),
    ("VirtualLsiLogicController", "scsi", "lsilogic"),
    ("VirtualBusLogicController", "scsi", "buslogic"),
    ("VirtualSCSIController", "scsi", "scsi"),
    ("VirtualNVMEController", "nvme", "nvme"),
    ("VirtualAHCIController", "sata", "ahci"),
    ("VirtualSATAController", "sata", "sata"),
    ("VirtualIDEController", "ide", "ide"),
)
#: pyvmomi NIC type -> adapter type, most specific first (Vmxnet3Vrdma is a Vmxnet3).
_NICS: tuple[tuple[str, str], ...] = (
    ("VirtualVmxnet3Vrdma", "vmxnet3vrdma"),
    ("VirtualVmxnet3", "vmxnet3"),
    ("VirtualVmxnet2", "vmxnet2"),
    ("VirtualE1000e", "e1000e"),
    ("VirtualE1000", "e1000"),
    ("VirtualPCNet32", "pcnet32"),
    ("VirtualSriovEthernetCard", "sriov"),
    ("VirtualEthernetCard", "ethernet"),
)


def _classify(device: Any) -> DeviceClass | None:
    """What :mod:`cbtstream.vsphere.description` needs to know from a device's pyvmomi type;
    None for devices a description leaves out (keyboard, video, CD-ROM...)."""
    dev = vim.vm.device
    if isinstance(device, dev.VirtualDisk):
        return DeviceClass("disk", skip_reason=skip_reason(device))
    for name, kind, model in _CONTROLLERS:
        if isinstance(device, getattr(dev, name)):
            return DeviceClass("controller", kind, model)
    for name, model in _NICS:
        if isinstance(device, getattr(dev, name)):
            return DeviceClass("nic", model=model)
    return None
