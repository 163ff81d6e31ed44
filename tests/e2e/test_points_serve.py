"""``cbtstream points serve`` through the real pipeline (Kafka, Faust, the simulator): an older
restore point served read-only over NBD reads, with QEMU and nbdcopy, byte for byte as the model
of its cycle; a write through NBD is refused; the live replica is untouched; a sync of the served
disk waits for the replica's lock and commits once the serve ends; a point that does not prove is
not served."""

from __future__ import annotations

import asyncio
import errno
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cbtctl.demo.processes import child_env
from cbtctl.demo.scenario import Scenario, random_name
from cbtctl.demo.workload import initial_fill, scattered
from cbtstream.config import PointsPolicy, Settings
from consumers.nbd import protocol as p
from consumers.nbd.client import NbdClient
from consumers.nbd.errors import NbdServerError
from consumers.nbd.uri import parse_nbd_uri
from consumers.replica.store import ReplicaBusy, ReplicaStore
from schemas.events import ChangeIdCommitted
from tests.e2e.conftest import Pipeline
from tests.e2e.test_points import SIZES, _ok, _with_points, models

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(shutil.which("qemu-img") is None or shutil.which("qemu-io")
                                 is None or shutil.which("nbdcopy") is None,
                                 reason="needs qemu-img, qemu-io and nbdcopy")]


def serve(settings: Settings, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "cbtctl.cli", "points", "serve", *args,
                             "--json"], env=child_env(settings), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


async def served(proc: subprocess.Popen[str], n: int = 1, timeout_s: float = 30.0
                 ) -> list[dict[str, object]]:
    """The ``n`` JSON lines the serve prints once clients can connect."""
    assert proc.stdout is not None
    rows = []
    for _ in range(n):
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), timeout_s)
        assert line, f"serve exited {proc.wait()}: {proc.stderr.read() if proc.stderr else ''}"
        rows.append(json.loads(line))
    return rows


def stop(proc: subprocess.Popen[str]) -> tuple[int, str]:
    """SIGTERM, then the exit code and what it wrote to stderr (its log)."""
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    return proc.returncode, err


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


async def forced_write(uri: str) -> int:
    """Send an NBD WRITE to the export whatever its flags say (the client refuses to on a
    read-only export, so the request is submitted below that check): the server's errno."""
    async with NbdClient(parse_nbd_uri(uri)) as client:
        assert client.read_only
        try:
            await client._submit(p.CMD_WRITE, 0, 4096, data=b"\xee" * 4096)
        except NbdServerError as exc:
            return exc.errno
    return 0


async def test_serve_an_older_point_read_only(
    scenario: Scenario, pipeline: Pipeline, e2e_settings: Settings, tmp_path: Path,
) -> None:
    settings = _with_points(e2e_settings, PointsPolicy(count=4))
    pipeline.settings = settings
    pipeline.start_copier()
    vm = await scenario.create_vm(random_name("e2e-serve"), SIZES)
    keys = [d.key for d in vm.disks]
    served_key, other = keys
    disk = f"{vm.instance_uuid}/disk-{served_key}"
    rng = scenario.rng
    snaps: list[str] = []
    at_cycle: dict[str, dict[int, bytes]] = {}
    for n in (1, 2, 3):
        c = await scenario.cycle(n, [w for d in vm.disks for w in (
            initial_fill(rng, d.key, d.capacity) if n == 1
            else scattered(rng, d.key, d.capacity))])
        _ok(c)
        snaps.append(c.vm_snapshot)
        at_cycle[c.vm_snapshot] = models(scenario, keys)
    oldest, live = snaps[0], snaps[-1]
    assert at_cycle[oldest][served_key] != at_cycle[live][served_key]
    replica = scenario.replica(served_key)

    # --- one disk, the oldest point, TCP on a free loopback port ---------------------------
    proc = serve(settings, "--disk", disk, "--at", oldest, "--port", "0", "--for", "120")
    try:
        (row,) = await served(proc)
        uri = str(row["uri"])
        assert uri.startswith("nbd://127.0.0.1:") and row["vm_snapshot"] == oldest
        assert row["proven"] is True
        # the replica's lock is held while it serves
        with pytest.raises(ReplicaBusy):
            async with ReplicaStore(replica.parent, replica.name).lock(wait_s=0):
                pass
        # read over NBD with QEMU and with nbdcopy: the model of that cycle, byte for byte
        out = tmp_path / "qemu.raw"
        done = run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(out))
        assert done.returncode == 0, done.stderr
        assert out.read_bytes() == at_cycle[oldest][served_key]
        done = run("nbdcopy", uri, str(tmp_path / "nbdcopy.raw"))
        assert done.returncode == 0, done.stderr
        assert (tmp_path / "nbdcopy.raw").read_bytes() == at_cycle[oldest][served_key]
        # writes are refused: QEMU will not open it for writing, a forced write gets EPERM
        done = run("qemu-io", "-f", "raw", "-c", "write -P 0xee 0 4k", uri)
        assert done.returncode != 0, done.stdout
        assert await forced_write(uri) == errno.EPERM
        # and the live replica is untouched
        assert replica.read_bytes() == at_cycle[live][served_key]

        # a sync of the served disk waits for the lock; the VM's other disk syncs meanwhile
        await scenario.write([w for d in vm.disks for w in scattered(rng, d.key, d.capacity)])
        snap = (await scenario.snapshot())[0].vm_snapshot
        await scenario.wait(snap, [other])
        assert scenario.watcher is not None
        await asyncio.sleep(2)
        assert served_key not in scenario.watcher.outcomes(snap)
        assert replica.read_bytes() == at_cycle[live][served_key]
        done = run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(out))
        assert done.returncode == 0 and out.read_bytes() == at_cycle[oldest][served_key]
    finally:
        code, log = stop(proc)
    assert code == 0, log
    assert "a sync of this disk waits until the serve ends" in log
    # the serve ended: the lock is free, the waiting sync commits
    started = time.monotonic()
    await scenario.wait(snap, [served_key])
    assert scenario.watcher is not None
    outcome = scenario.watcher.outcomes(snap)[served_key]
    assert isinstance(outcome, ChangeIdCommitted), outcome
    assert time.monotonic() - started < 30
    assert replica.read_bytes() == scenario.model(served_key).read_bytes()

    # --- every disk of a VM point, on a unix socket ------------------------------------------
    sock = tmp_path / "points.sock"
    proc = serve(settings, "--vm", vm.instance_uuid, "--at", snaps[1], "--socket", str(sock))
    try:
        rows = await served(proc, 2)
        assert sock.stat().st_mode & 0o777 == 0o600
        for r in rows:
            key = int(str(r["disk_key"]).rsplit("-", 1)[1])
            assert str(r["uri"]).startswith("nbd+unix:///") and r["vm_snapshot"] == snaps[1]
            out = tmp_path / f"vm-{key}.raw"
            done = run("nbdcopy", str(r["uri"]), str(out))
            assert done.returncode == 0, done.stderr
            assert out.read_bytes() == at_cycle[snaps[1]][key], key
    finally:
        code, log = stop(proc)
    assert code == 0 and not sock.exists(), log

    # --- a point that does not prove is not served --------------------------------------------
    # one byte of the other disk's replica changed behind the copier's back: its live point
    # reads every byte from the replica
    bad = scenario.replica(other)
    with open(bad, "r+b") as fh:
        first = fh.read(1)
        fh.seek(0)
        fh.write(bytes([first[0] ^ 0xFF]))
    proc = serve(settings, "--disk", f"{vm.instance_uuid}/disk-{other}", "--at", snap,
                 "--port", "0")
    out_text, err_text = proc.communicate(timeout=60)
    assert proc.returncode == 1, out_text + err_text
    assert "does not match its hash tree root" in out_text and "uri" not in out_text
