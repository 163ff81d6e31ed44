"""qemu-nbd as a copy source: it serves one client at a time (without ``-e``) and does not
advertise multi-conn, so the engine must not hang waiting for a second connection."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cbtstream.extents import Extent
from consumers.copy.engine import CopyOptions, copy_disk
from consumers.copy.sources import NbdSource
from consumers.copy.targets import FileTarget
from consumers.nbd.uri import parse_nbd_uri
from tests.copy.images import M, make_image
from tests.copy.treeref import root_of

SIZE = 24 * M + 4096

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-nbd") is None or shutil.which("qemu-img") is None,
    reason="qemu-nbd and qemu-img are not installed (Debian: qemu-utils)")


@pytest.fixture
def qcow2_export(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    raw = tmp_path / "disk.raw"
    make_image(raw, SIZE, 11, [(0, 3 * M, "data"), (8 * M, 5 * M + 77, "data"),
                               (SIZE - 4096, 4096, "data")])
    qcow = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow)],
                   check=True)
    sock = tmp_path / "qemu-nbd.sock"
    proc = subprocess.Popen(["qemu-nbd", "-r", "-f", "qcow2", "-k", str(sock), str(qcow)])
    deadline = time.monotonic() + 10
    while not sock.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"nbd+unix:///?socket={sock}", raw
    finally:
        proc.terminate()
        proc.wait(10)


async def test_copy_from_qemu_nbd_with_default_connections(
    tmp_path: Path, qcow2_export: tuple[str, Path]
) -> None:
    uri, raw = qcow2_export
    target_path = tmp_path / "replica.img"
    with open(target_path, "wb") as fh:
        fh.truncate(SIZE)
    t0 = time.monotonic()
    async with NbdSource(parse_nbd_uri(uri), connections=2) as src:
        assert not src.clients[0].can_multi_conn
        assert len(src.clients) == 1  # the second handshake was refused or timed out, not hung
        async with FileTarget.open(target_path) as target:
            result = await copy_disk(src, target, [Extent(0, SIZE)], capacity=SIZE,
                                     options=CopyOptions(request_bytes=2 * M))
    assert time.monotonic() - t0 < 20
    assert target_path.read_bytes() == raw.read_bytes()
    assert result.replica_digest == root_of(raw.read_bytes())
