"""The replica file lock (consumers.copy.targets.lock_replica) against real QEMU and against
another opener in this process: whoever holds the file first keeps it."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path, PurePosixPath

import pytest

from consumers.copy.targets import ReplicaInUse, lock_replica, open_below

CAPACITY = 1 << 20


async def test_a_second_opener_is_refused_until_the_first_closes(tmp_path: Path) -> None:
    rel = PurePosixPath("vm", "disk-2000.img")
    first = open_below(tmp_path, rel, CAPACITY)
    try:
        with pytest.raises(ReplicaInUse, match="locked by another process"):
            open_below(tmp_path, rel, CAPACITY)
        # another descriptor of this process closing does not drop the lock (an OFD lock)
        os.close(os.open(tmp_path / "vm" / "disk-2000.img", os.O_RDONLY))
        fd = os.open(tmp_path / "vm" / "disk-2000.img", os.O_RDWR)
        try:
            with pytest.raises(ReplicaInUse):
                lock_replica(fd, "again")
        finally:
            os.close(fd)
    finally:
        await first.stop()
    second = open_below(tmp_path, rel, CAPACITY)  # released with the first target
    await second.stop()


def _qemu_holding(path: Path) -> subprocess.Popen[bytes]:
    """``qemu-io`` with ``path`` open read-write for 30 s (QEMU locks it once open)."""
    return subprocess.Popen(["qemu-io", "-f", "raw", "-c", "sleep 30000", str(path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.mark.skipif(shutil.which("qemu-io") is None, reason="needs qemu-io")
async def test_qemu_and_the_copier_exclude_each_other(tmp_path: Path) -> None:
    rel = PurePosixPath("vm", "disk-2001.img")
    path = tmp_path / "vm" / "disk-2001.img"
    target = open_below(tmp_path, rel, CAPACITY)
    try:
        probe = subprocess.run(["qemu-io", "-f", "raw", "-c", "read 0 512", str(path)],
                               capture_output=True, text=True, timeout=30)
        assert probe.returncode != 0 and "lock" in probe.stderr  # QEMU cannot open it
    finally:
        await target.stop()
    qemu = _qemu_holding(path)
    try:
        for _ in range(600):  # QEMU starts in well under 30 s, also on a loaded machine
            try:
                t = open_below(tmp_path, rel, CAPACITY)
            except ReplicaInUse:
                break
            await t.stop()  # QEMU has not opened it yet
            subprocess.run(["sleep", "0.05"], check=True)
        else:
            raise AssertionError("the copier's open never saw QEMU's lock")
    finally:
        qemu.kill()
        qemu.wait()
    before = path.stat().st_size
    t = open_below(tmp_path, rel, CAPACITY)  # QEMU gone: the copier writes again
    await t.stop()
    assert before == CAPACITY
