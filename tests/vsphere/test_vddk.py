"""``copier.exports = "vddk"`` through real nbdkit, the project's stand-in for the vddk plugin and
the private simulator: what the export serves, and every way starting it can fail.

The stand-in checks what the real plugin would see (parameters, thumbprint against the server's
real certificate, a real SOAP login, the disk named by vm/snapshot/file), so a wrong command
line fails here the way it would against vCenter.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cbtctl.stack.vcsim import VcsimService
from cbtctl.stack.vddk_standin import STAND_IN
from cbtstream.config import Settings, StackSettings, VSphereSettings
from cbtstream.vsphere.adapter import VmRef, VSphereClient
from cbtstream.vsphere.simctl import SimulatorControl
from consumers.exports import ExportNotFound
from consumers.vddk.errors import (
    VddkLoginFailed,
    VddkPasswordError,
    VddkThumbprintMismatch,
    VddkUnavailable,
)
from consumers.vddk.exports import VddkExports
from schemas.disk import DiskRef

pytestmark = pytest.mark.integration

MiB = 1 << 20
SIZE = 3 * MiB + 5 * 1024
PASSWORD = "pass"  # the simulator's login (tests/vsphere/conftest.py starts it with defaults)


def vddk_settings(vcsim: VcsimService, run_dir: Path, **vddk: object) -> Settings:
    data: dict[str, object] = {"plugin": str(STAND_IN), "run_dir": run_dir, **vddk}
    return Settings(
        vsphere=VSphereSettings(url=vcsim.sdk_url, cafile=vcsim.cert_file),
        stack=StackSettings(dir=vcsim.state_dir),
        copier={"exports": "vddk", "vddk": data, "state_dir": run_dir.parent / "copier",
                "nbd_allow": ("127.0.0.1", f"unix:{run_dir}/")},
    )


@pytest.fixture
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Short: unix socket paths are limited to 107 bytes.
    return Path(tmp_path_factory.mktemp("v")) / "run"


@pytest.fixture
async def exports(vcsim: VcsimService, client: VSphereClient,
                  run_dir: Path) -> AsyncIterator[VddkExports]:
    e = VddkExports(vddk_settings(vcsim, run_dir), client)
    await e.start()
    yield e
    await e.stop()


@pytest.fixture
async def snapshot_disk(sim: SimulatorControl, client: VSphereClient,
                        vm_name: str) -> tuple[VmRef, str, DiskRef, bytes]:
    """A snapshot of a one-disk VM, the disk, and its content as of the snapshot; the guest
    writes over it afterwards."""
    simvm = sim.create_vm(vm_name, [SIZE], cbt=True)
    key = simvm.disks[0].key
    content = bytearray(SIZE)
    for off, data in ((0, b"first sector"), (MiB + 7, os.urandom(200_000)),
                      (SIZE - 4, b"TAIL")):
        sim.write(simvm.moref, key, off, data)
        content[off:off + len(data)] = data
    vm = await client.find_vm(instance_uuid=simvm.instance_uuid)
    snap = await client.create_snapshot(vm, "vddk")
    sim.write(simvm.moref, key, MiB + 7, b"changed after the snapshot")
    disk = next(d for d, _ in snap.disks if d.device_key == key)
    return vm, snap.moref, disk, bytes(content)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is gone for our purpose once it is not running.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def nbdkit_pids(run_dir: Path) -> list[int]:
    return [int(p.read_text()) for p in run_dir.glob("*/nbdkit.pid") if p.read_text().strip()]


async def nbdcopy(uri: str, out: Path) -> None:
    proc = await asyncio.create_subprocess_exec("nbdcopy", uri, str(out))
    assert await asyncio.wait_for(proc.wait(), 60) == 0


async def test_export_serves_the_frozen_snapshot_read_only(
    exports: VddkExports, snapshot_disk: tuple[VmRef, str, DiskRef, bytes], tmp_path: Path,
    run_dir: Path,
) -> None:
    vm, snap, disk, content = snapshot_disk
    async with exports.export(disk, snap) as export:
        assert export.uri.startswith("nbd+unix:///?socket=")
        assert export.max_connections == 1
        [pid] = nbdkit_pids(run_dir)
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert b"--readonly" in cmdline and b"--exit-with-parent" in cmdline
        assert f"file={disk.backing_file}".encode() in cmdline
        assert f"vm=moref={vm.moref}".encode() in cmdline
        # The password reached nbdkit through a pipe: not in its argv, not in its log.
        [password_arg] = [a for a in cmdline if a.startswith(b"password=")]
        assert password_arg[len(b"password="):].lstrip(b"-").isdigit()
        assert not [a for a in cmdline if PASSWORD.encode() in a.replace(b"password=", b"")]
        assert PASSWORD not in (run_dir / next(run_dir.iterdir()) / "nbdkit.log").read_text()
        await nbdcopy(export.uri, tmp_path / "copy.img")
        assert (tmp_path / "copy.img").read_bytes() == content
        info = subprocess.run(["nbdinfo", "--json", export.uri], capture_output=True,
                              text=True, check=True).stdout
        assert '"is_read_only": true' in info
        mapped = subprocess.run(["nbdinfo", "--map", export.uri], capture_output=True,
                                text=True, check=True).stdout
        assert "hole" in mapped and "data" in mapped  # extents come through cacheextents
    assert not pid_alive(pid)
    assert list(run_dir.iterdir()) == []


async def test_password_by_file_and_unreadable_file(
    vcsim: VcsimService, client: VSphereClient, run_dir: Path, tmp_path: Path,
    snapshot_disk: tuple[VmRef, str, DiskRef, bytes],
) -> None:
    _, snap, disk, content = snapshot_disk
    secret = tmp_path / "vddk.pw"
    secret.write_text(PASSWORD + "\n")
    secret.chmod(0o600)
    ok = VddkExports(vddk_settings(vcsim, run_dir, password_file=secret), client)
    async with ok.export(disk, snap) as export:
        [pid] = nbdkit_pids(run_dir)
        assert f"password=+{secret}".encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
        await nbdcopy(export.uri, tmp_path / "copy.img")
    assert (tmp_path / "copy.img").read_bytes() == content

    missing = VddkExports(vddk_settings(vcsim, run_dir, password_file=tmp_path / "nope"), client)
    with pytest.raises(VddkPasswordError, match="nope"):
        async with missing.export(disk, snap):
            pass
    assert list(run_dir.iterdir()) == []


async def test_wrong_thumbprint_is_refused_when_vddk_connects(
    vcsim: VcsimService, client: VSphereClient, run_dir: Path,
    snapshot_disk: tuple[VmRef, str, DiskRef, bytes],
) -> None:
    _, snap, disk, _ = snapshot_disk
    wrong = ":".join(["AB"] * 20)
    e = VddkExports(vddk_settings(vcsim, run_dir, thumbprint=wrong), client)
    with pytest.raises(VddkThumbprintMismatch, match="thumbprint"):
        async with e.export(disk, snap):
            pass
    assert list(run_dir.iterdir()) == []


async def test_wrong_password_fails_the_login(
    vcsim: VcsimService, run_dir: Path, snapshot_disk: tuple[VmRef, str, DiskRef, bytes],
    client: VSphereClient,
) -> None:
    _, snap, disk, _ = snapshot_disk
    s = vddk_settings(vcsim, run_dir)
    s = s.model_copy(update={"vsphere": s.vsphere.model_copy(
        update={"password": type(s.vsphere.password)("not-the-password")})})
    with pytest.raises(VddkLoginFailed) as caught:
        async with VddkExports(s, client).export(disk, snap):
            pass
    assert "not-the-password" not in str(caught.value)


async def test_plugin_missing_or_broken_stops_start_up(vcsim: VcsimService,
                                                       client: VSphereClient,
                                                       run_dir: Path) -> None:
    real = VddkExports(vddk_settings(vcsim, run_dir, plugin="vddk"), client)
    with pytest.raises(VddkUnavailable, match=r"cannot load the plugin 'vddk'.*Debian 12"):
        await real.start()
    libdir = VddkExports(vddk_settings(vcsim, run_dir, libdir=run_dir / "no-vddk"), client)
    with pytest.raises(VddkUnavailable, match="no-vddk"):
        await libdir.start()
    nbdkit = VddkExports(vddk_settings(vcsim, run_dir, nbdkit="/nonexistent/nbdkit"), client)
    with pytest.raises(VddkUnavailable, match="not found"):
        await nbdkit.start()


async def test_socket_folder_must_be_allowed(vcsim: VcsimService, client: VSphereClient,
                                             run_dir: Path) -> None:
    s = vddk_settings(vcsim, run_dir)
    s = s.model_copy(update={"copier": s.copier.model_copy(update={"nbd_allow": ("127.0.0.1",)})})
    from cbtstream.errors import ConfigError

    with pytest.raises(ConfigError, match="nbd_allow"):
        await VddkExports(s, client).start()


async def test_gone_snapshot_and_foreign_disk(
    exports: VddkExports, client: VSphereClient,
    snapshot_disk: tuple[VmRef, str, DiskRef, bytes],
) -> None:
    vm, snap, disk, _ = snapshot_disk
    other = disk.model_copy(update={"backing_uuid": "6000C29a-0000-0000-0000-000000000000"})
    with pytest.raises(ExportNotFound, match="not"):
        async with exports.export(other, snap):
            pass
    await client.remove_snapshot(vm, snap)
    with pytest.raises(Exception, match="snapshot"):
        async with exports.export(disk, snap):
            pass


async def test_cancelled_copy_leaves_no_process(
    exports: VddkExports, run_dir: Path, snapshot_disk: tuple[VmRef, str, DiskRef, bytes],
) -> None:
    _, snap, disk, _ = snapshot_disk
    entered = asyncio.Event()

    async def sync() -> None:
        async with exports.export(disk, snap):
            entered.set()
            await asyncio.sleep(3600)

    task = asyncio.create_task(sync())
    await asyncio.wait_for(entered.wait(), 60)
    [pid] = nbdkit_pids(run_dir)
    assert pid_alive(pid)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not pid_alive(pid)
    assert list(run_dir.iterdir()) == []


async def test_copier_killed_takes_nbdkit_with_it(
    vcsim: VcsimService, run_dir: Path, snapshot_disk: tuple[VmRef, str, DiskRef, bytes],
    tmp_path: Path,
) -> None:
    """SIGKILL leaves no cleanup code to run: --exit-with-parent must end nbdkit."""
    _, snap, disk, _ = snapshot_disk
    settings = vddk_settings(vcsim, run_dir)
    script = tmp_path / "holder.py"
    script.write_text(textwrap.dedent(f"""
        import asyncio, sys
        from cbtstream.config import Settings
        from cbtstream.vsphere.adapter import VSphereClient
        from consumers.vddk.exports import VddkExports
        from schemas.disk import DiskRef

        async def main():
            settings = Settings.model_validate_json(sys.stdin.read())
            async with VSphereClient(settings.vsphere) as client:
                e = VddkExports(settings, client)
                disk = DiskRef.model_validate_json({disk.model_dump_json()!r})
                async with e.export(disk, {snap!r}):
                    print("ready", flush=True)
                    await asyncio.sleep(3600)
        asyncio.run(main())
    """))
    data = settings.model_dump_json(context={"secrets": True})
    data = data.replace('"**********"', f'"{PASSWORD}"')
    holder = await asyncio.create_subprocess_exec(
        sys.executable, str(script), stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE)
    try:
        assert holder.stdin is not None and holder.stdout is not None
        holder.stdin.write(data.encode())
        holder.stdin.close()
        line = await asyncio.wait_for(holder.stdout.readline(), 60)
        assert line.strip() == b"ready"
        [pid] = nbdkit_pids(run_dir)
        holder.send_signal(signal.SIGKILL)
        await asyncio.wait_for(holder.wait(), 10)
        assert await asyncio.to_thread(wait_gone, pid, 10.0)
    finally:
        if holder.returncode is None:
            holder.kill()
            await holder.wait()


def wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
