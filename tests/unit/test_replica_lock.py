"""The replica file lock (consumers.copy.targets.lock_replica) against real QEMU and against
another opener in this process: whoever holds the file first keeps it; and a copy cancelled
while its thread opens the replica (a rebalance) does not leave the file locked."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import threading
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from cbtstream.threads import opened_in_thread
from consumers.copy.targets import FileTarget, ReplicaInUse, lock_replica, open_below

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


class _Gate:
    """Holds an opener inside its thread until the test has cancelled the caller."""

    def __init__(self) -> None:
        self.entered, self.release = threading.Event(), threading.Event()

    def hold(self) -> None:
        """Called by the opener, in its thread."""
        self.entered.set()
        self.release.wait(10)

    async def cancel_while_held(self, task: asyncio.Task[Any]) -> None:
        """Cancel ``task`` while its opener is held, then let the opener go on for a caller
        that is gone."""
        await asyncio.to_thread(self.entered.wait, 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        self.release.set()
        self.entered.clear()


async def test_a_copy_cancelled_while_its_thread_opens_the_replica_leaves_it_unlocked(
        tmp_path: Path) -> None:
    """The task is cancelled while the opener runs in its thread (it cannot be stopped): what
    the thread opens and locks after the cancel is closed, so the next sync can lock it."""
    rel = PurePosixPath("vm", "disk-2002.img")
    gate = _Gate()

    def slow_open() -> FileTarget:
        gate.hold()
        return open_below(tmp_path, rel, CAPACITY)

    await gate.cancel_while_held(asyncio.create_task(
        opened_in_thread(slow_open, close=FileTarget.close)))
    for _ in range(100):
        try:
            again = open_below(tmp_path, rel, CAPACITY)
            break
        except ReplicaInUse:
            await asyncio.sleep(0.05)
    else:
        pytest.fail("the replica stayed locked by a cancelled open")
    again.close()
    # without the helper the same cancel leaves the lock in this process for good
    gate.release.clear()
    await gate.cancel_while_held(asyncio.create_task(asyncio.to_thread(slow_open)))
    await asyncio.sleep(0.5)
    with pytest.raises(ReplicaInUse):
        open_below(tmp_path, rel, CAPACITY)


async def test_an_open_that_fails_after_the_cancel_closes_nothing(tmp_path: Path) -> None:
    closed: list[object] = []
    gate = _Gate()

    def failing() -> object:
        gate.hold()
        raise OSError("no such device")

    await gate.cancel_while_held(asyncio.create_task(
        opened_in_thread(failing, close=closed.append)))
    await asyncio.sleep(0.2)
    assert closed == []
    # not cancelled: the result and the errors are the caller's, as with asyncio.to_thread
    assert await opened_in_thread(lambda: 7, close=closed.append) == 7
    with pytest.raises(OSError, match="no such device"):
        await opened_in_thread(failing, close=closed.append)
    assert closed == []


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
