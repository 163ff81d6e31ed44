"""The production :class:`~consumers.exports.ExportResolver`: ``nbdkit vddk`` per
(disk, VM snapshot).

Order of :meth:`VddkExports.export`, each step able to fail with a reason:

1. find the VM (its moref on this vCenter) and read the **snapshot's** config: the device with
   the disk's key must still be the same disk (backing uuid, capacity), and its backing
   ``fileName`` is what VDDK opens (``file=``);
2. decide server, port and thumbprint: the vCenter of ``vsphere.url`` (thumbprint configured, or
   the SHA-1 of the certificate a TLS connection *verified* like the vSphere client's saw), or
   with ``connect = "host"`` the VM's ESXi host and its ``summary.config.sslThumbprint``;
3. start nbdkit (``command.nbdkit_argv``) in a private 0700 folder, the password through a
   pipe (``-FD``) or ``+FILE``; wait for its pidfile;
4. probe: VDDK logs in and opens the disk only when an NBD client connects, so connect once and
   compare the export's size with the disk's capacity (a wrong thumbprint, password or file
   shows here, named from nbdkit's stderr);
5. yield the ``nbd+unix`` URI (the copier still checks it against ``copier.nbd_allow``) with
   ``connections=1``: each NBD connection is a VDDK session, and sessions on one disk slow
   each other down;
6. on exit (sync done, failed or cancelled) stop nbdkit and remove its folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import secrets
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from urllib.parse import quote, urlsplit

from cbtstream.config import Settings
from cbtstream.errors import CbtStreamError, ConfigError
from cbtstream.vsphere.adapter import VmRef, VSphereClient
from consumers.exports import Export, ExportNotFound
from consumers.vddk.command import (
    VddkDisk,
    check_dump,
    classify,
    dump_plugin_argv,
    error_text,
    nbdkit_argv,
)
from consumers.vddk.errors import VddkStartFailed, VddkUnavailable
from consumers.vddk.process import NbdkitProcess, make_private_dir
from schemas.disk import DiskRef

#: Connects to an NBD URI and returns the export's size (the copier's own NBD client).
Probe = Callable[[str], Awaitable[int]]
#: Longest unix socket path the kernel accepts (sun_path is 108 bytes with its NUL).
_SUN_PATH_MAX = 107


async def nbd_probe(uri: str) -> int:
    """Connect once with the copier's NBD client: the handshake makes VDDK open the disk."""
    from consumers.nbd.client import NbdClient
    from consumers.nbd.uri import parse_nbd_uri

    async with NbdClient(parse_nbd_uri(uri), connect_timeout=60.0) as client:
        return int(client.size)


def certificate_thumbprint(host: str, port: int, context: ssl.SSLContext) -> str:
    """SHA-1 of the certificate ``host:port`` presents over a connection ``context`` verified."""
    with socket.create_connection((host, port), timeout=30) as raw, \
            context.wrap_socket(raw, server_hostname=host) as tls:
        der = tls.getpeercert(binary_form=True) or b""
    return ":".join(f"{b:02X}" for b in hashlib.sha1(der).digest())


class VddkExports:
    """Starts one ``nbdkit vddk`` per (disk, VM snapshot); see the module docstring."""

    def __init__(self, settings: Settings, client: VSphereClient, *,
                 probe: Probe = nbd_probe) -> None:
        self.settings = settings
        self.vddk = settings.copier.vddk
        self.client = client
        self._probe = probe
        self.run_dir = (self.vddk.run_dir or settings.copier.state_dir / "vddk").resolve()
        url = urlsplit(settings.vsphere.url)
        self._vc_host = url.hostname or ""
        self._vc_port = url.port or 443
        self._vms: dict[str, VmRef] = {}
        self._thumbprints: dict[tuple[str, int], str] = {}
        self._running: set[NbdkitProcess] = set()

    # -- start-up -------------------------------------------------------------------------
    async def start(self) -> None:
        """Check that the plugin, the filters and VDDK load (``--dump-plugin``) and that the
        socket folder is allowed: a copier that cannot read any disk must not start."""
        from consumers.nbd.uri import NbdAddress, check_allowed

        argv = dump_plugin_argv(self.vddk)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT)
        except FileNotFoundError as exc:
            raise VddkUnavailable(f"{self.vddk.nbdkit} not found: install Debian's nbdkit "
                                  "(apt-get install nbdkit)") from exc
        out, _ = await proc.communicate()
        await asyncio.to_thread(remove_stale, self.run_dir)
        check_dump(self.vddk, proc.returncode or 0, out.decode(errors="replace"))
        probe_socket = str(self.run_dir / "xxxxxxxxxxxxxxxx" / "nbd.sock")
        if len(probe_socket) > _SUN_PATH_MAX:
            raise ConfigError(f"copier.vddk.run_dir {self.run_dir} is too long for unix socket "
                              f"paths ({len(probe_socket)} > {_SUN_PATH_MAX} bytes)")
        try:
            check_allowed(NbdAddress(socket_path=probe_socket), self.settings.copier.nbd_allow)
        except CbtStreamError as exc:
            raise ConfigError(f"the VDDK exports' sockets are under {self.run_dir}: add "
                              f"'unix:{self.run_dir}/' to copier.nbd_allow") from exc

    async def stop(self) -> None:
        """Stop every nbdkit still running (a safety net: each export stops its own)."""
        for proc in list(self._running):
            await proc.stop()
        self._running.clear()

    # -- the export -------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def export(self, disk: DiskRef, vm_snapshot: str) -> AsyncIterator[Export]:
        target = await self.disk_of(disk, vm_snapshot)
        what = f"{disk.key} in {vm_snapshot}"
        run = make_private_dir(self.run_dir, secrets.token_hex(8))
        socket_path = run / "nbd.sock"
        read_fd = -1
        try:
            password_arg, read_fd = self._password()
            argv = nbdkit_argv(self.vddk, target, password_arg=password_arg,
                               socket=socket_path, pidfile=run / "nbdkit.pid")
            proc = NbdkitProcess(argv, run, pass_fds=(read_fd,) if read_fd >= 0 else (),
                                 what=what)
        except BaseException:
            if read_fd >= 0:
                os.close(read_fd)
            import shutil

            shutil.rmtree(run, ignore_errors=True)
            raise
        self._running.add(proc)
        try:
            try:
                await proc.start(self.vddk.start_timeout_s)
            finally:
                if read_fd >= 0:
                    os.close(read_fd)
            uri = f"nbd+unix:///?socket={quote(str(socket_path))}"
            await self._check_size(proc, uri, disk, what)
            yield Export(uri=uri, max_connections=1)
        finally:
            self._running.discard(proc)
            await proc.stop()

    async def _check_size(self, proc: NbdkitProcess, uri: str, disk: DiskRef, what: str) -> None:
        try:
            size = await asyncio.wait_for(self._probe(uri), self.vddk.start_timeout_s)
        except (TimeoutError, CbtStreamError, OSError) as exc:
            await asyncio.sleep(0.1)  # let nbdkit finish writing why it refused
            stderr = proc.stderr()
            if error_text(stderr) and "error" in stderr:
                raise classify(stderr, f"VDDK could not open {what}") from exc
            raise VddkStartFailed(f"probe of {what} failed: {exc}") from exc
        if size != disk.capacity_bytes:
            raise ExportNotFound(f"VDDK export of {what} has {size} bytes, the disk "
                                 f"{disk.capacity_bytes}: not the same disk")

    def _password(self) -> tuple[str, int]:
        """``(+FILE, -1)`` or ``(-FD, fd)``: the read end of a pipe holding the password."""
        if self.vddk.password_file is not None:
            return f"+{self.vddk.password_file.resolve()}", -1
        secret = self.settings.vsphere.password.get_secret_value().encode()
        read_fd, write_fd = os.pipe()
        try:
            if len(secret) >= 65536:  # a pipe buffer; no real password is that long
                raise ConfigError("the vSphere password is too long to hand to nbdkit")
            os.write(write_fd, secret)
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        os.set_inheritable(read_fd, True)
        return f"-{read_fd}", read_fd

    async def disk_of(self, disk: DiskRef, vm_snapshot: str) -> VddkDisk:
        """Steps 1-2 of the module docstring: what VDDK must open, on which server."""
        vm = self._vms.get(disk.vm_instance_uuid)
        if vm is None:
            vm = await self.client.find_vm(instance_uuid=disk.vm_instance_uuid)
            self._vms[disk.vm_instance_uuid] = vm
        snap = await self.client.snapshot_info(vm, vm_snapshot)
        device = next((d for d, _ in snap.disks if d.device_key == disk.device_key), None)
        if device is None:
            raise ExportNotFound(f"snapshot {vm_snapshot} has no disk {disk.device_key}")
        if (device.backing_uuid, device.capacity_bytes) != (disk.backing_uuid,
                                                              disk.capacity_bytes):
            raise ExportNotFound(f"disk {disk.device_key} of snapshot {vm_snapshot} is not "
                                 f"{disk.key} (backing uuid or capacity differ)")
        if not device.backing_file:
            raise ExportNotFound(f"disk {disk.device_key} of {vm_snapshot} has no backing file")
        server, port, thumbprint = await self._server(vm)
        return VddkDisk(server=server, port=port, user=self.vddk.user
                        or self.settings.vsphere.username, thumbprint=thumbprint,
                        vm_moref=vm.moref, snapshot_moref=vm_snapshot, file=device.backing_file)

    async def _server(self, vm: VmRef) -> tuple[str, int | None, str]:
        if self.vddk.connect == "host":
            host = await self.client.vm_host(vm)
            thumb = self.vddk.thumbprint or host.thumbprint
            if not thumb:
                raise ConfigError(f"vCenter records no sslThumbprint for host {host.name}: "
                                  "set copier.vddk.thumbprint")
            return self.vddk.server or host.name, self.vddk.port, thumb.upper()
        server = self.vddk.server or self._vc_host
        port = self.vddk.port or self._vc_port
        if self.vddk.thumbprint:
            return server, port, self.vddk.thumbprint.upper()
        key = (server, port)
        if key not in self._thumbprints:
            vs = self.settings.vsphere
            if vs.insecure:
                raise ConfigError("vsphere.insecure is set, so the server's certificate cannot "
                                  "be trusted for VDDK: set copier.vddk.thumbprint")
            ctx = ssl.create_default_context(cafile=str(vs.cafile) if vs.cafile else None)
            try:
                self._thumbprints[key] = await asyncio.to_thread(
                    certificate_thumbprint, server, port, ctx)
            except ssl.SSLCertVerificationError as exc:
                raise ConfigError(f"{server}:{port}: certificate not trusted "
                                  f"({exc.verify_message}); set vsphere.cafile or "
                                  "copier.vddk.thumbprint") from exc
            except OSError as exc:
                raise VddkStartFailed(f"cannot reach {server}:{port}: {exc}") from exc
        return server, port, self._thumbprints[key]


def remove_stale(run_dir: Path) -> None:
    """Remove the folders of exports whose nbdkit is gone (a copier killed with SIGKILL leaves
    its folder; ``--exit-with-parent`` already ended its nbdkit). Folders of live nbdkits, e.g.
    of another copier sharing the folder, are left alone."""
    import shutil

    if not run_dir.is_dir():
        return
    for sub in run_dir.iterdir():
        try:
            pid = int((sub / "nbdkit.pid").read_text().strip())
            os.kill(pid, 0)
            continue  # still running
        except (OSError, ValueError):
            pass
        shutil.rmtree(sub, ignore_errors=True)
