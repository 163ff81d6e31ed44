"""Operator-chosen targets through the real pipeline: one disk into a block device (a loop
device over a file), one into an NBD export (qemu-nbd onto a qcow2 file), both mapped in the
copier's configuration (never in events). Two cycles (full, then incremental) and each target is
compared with the snapshot: the loop device byte for byte, the qcow2 with ``qemu-img compare``."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cbtctl.demo.scenario import Scenario, random_name
from cbtctl.demo.workload import MiB, initial_fill, scattered
from cbtstream.config import Settings, TargetMapping
from tests.e2e.conftest import Pipeline
from tests.support import free_port

pytestmark = pytest.mark.integration

SIZES = [8 * MiB, 4 * MiB + 64 * 1024]


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[str]:
    if not os.path.exists("/dev/loop-control") or shutil.which("losetup") is None:
        pytest.skip("no loop devices on this machine (needs /dev/loop-control and losetup)")
    backing = tmp_path / "volume.raw"
    with open(backing, "wb") as fh:
        fh.truncate(SIZES[0])
    dev = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True,
                         text=True, check=True).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


@pytest.fixture
def qemu_nbd(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    qcow = tmp_path / "volume.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow), str(SIZES[1])],
                   check=True)
    port = free_port()
    proc = subprocess.Popen(["qemu-nbd", "-f", "qcow2", "-b", "127.0.0.1", "-p", str(port),
                             "--persistent", "--cache=none", str(qcow)])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if subprocess.run(["nbdinfo", "--size", f"nbd://127.0.0.1:{port}"],
                          capture_output=True).returncode == 0:
            break
        time.sleep(0.1)
    try:
        yield f"nbd://127.0.0.1:{port}", qcow
    finally:
        proc.terminate()
        proc.wait(10)


def _same(device: str, model: Path) -> bool:
    want = model.read_bytes()
    with open(device, "rb") as fh:
        return fh.read(len(want)) == want


async def test_block_device_and_nbd_targets(
    scenario: Scenario, pipeline: Pipeline, e2e_settings: Settings, loop_device: str,
    qemu_nbd: tuple[str, Path], tmp_path: Path,
) -> None:
    vm = await scenario.create_vm(random_name("e2e-targets"), SIZES)
    a, b = (d.key for d in vm.disks)
    uri, qcow = qemu_nbd
    copier = e2e_settings.copier.model_copy(update={
        "targets": (TargetMapping(disk=f"{vm.instance_uuid}/disk-{a}", device=loop_device),
                    TargetMapping(disk=f"{vm.instance_uuid}/disk-{b}", nbd=uri)),
        "device_allow": ("/dev/loop*",),
    })
    pipeline.settings = e2e_settings.model_copy(update={"copier": copier})
    pipeline.start_copier()
    rng = scenario.rng
    cycles = [
        await scenario.cycle(1, [w for d in vm.disks for w in initial_fill(rng, d.key,
                                                                           d.capacity)]),
        await scenario.cycle(2, [w for d in vm.disks for w in scattered(rng, d.key,
                                                                        d.capacity)]),
    ]
    assert [sorted((r.replication_type, r.reason) for r in c.rows) for c in cycles] == [
        [("full", "no_previous_commit")] * 2, [("incremental", "previous_commit")] * 2]
    assert _same(loop_device, scenario.model(a))
    cmp = subprocess.run(["qemu-img", "compare", "-U", "-f", "raw", "-F", "qcow2",
                          str(scenario.model(b)), str(qcow)], capture_output=True, text=True)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    # the records of both live in the copier's state area, keyed by the target
    records = list((e2e_settings.copier.state_dir / "targets").glob("*.state"))
    assert len(records) == 2
    # nothing was written under the default replica paths
    assert not scenario.replica(a).exists() and not scenario.replica(b).exists()
