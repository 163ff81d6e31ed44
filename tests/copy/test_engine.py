# ruff: noqa: ASYNC220  (tests compare files synchronously on purpose)
"""The copy engine end to end: real nbdkit sources, file and NBD targets, byte-for-byte checks."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from cbtstream.config import CopierSettings
from cbtstream.errors import PermissionDenied
from cbtstream.extents import Extent
from consumers.copy import digest as dg
from consumers.copy.checkpoint import Checkpoint
from consumers.copy.engine import (
    CopyFailed,
    CopyOptions,
    DiskJob,
    copy_disk,
    copy_disks,
    verify_leaves,
)
from consumers.copy.progress import CopyProgress
from consumers.copy.sources import NbdSource, open_nbd_source
from consumers.copy.targets import NbdTarget
from consumers.nbd.uri import parse_nbd_uri
from consumers.replica.location import TargetResolver
from tests.copy.images import M, apply, make_image
from tests.copy.treeref import leaves_of, root_of
from tests.nbd.nbdkit import nbdkit, needs_nbdkit

pytestmark = needs_nbdkit

VM = "4211c3d5-7f1e-4b8a-9d6c-0123456789ab"
KEY = f"{VM}/disk-2000"
#: Not a multiple of any request size; data at the very end; holes and allocated zeros inside.
SIZE = 21 * M + 3 * 4096 + 5
LAYOUT = [
    (0, 3 * M + 100, "data"),
    (5 * M, 2 * M, "zeros"),
    (9 * M + 4096, 64 * 1024, "data"),
    (12 * M, 6 * M, "data"),
    (SIZE - 70000, 70000, "data"),
]
OPTS = CopyOptions(disk_key=KEY, request_bytes=2 * M, max_in_flight=4, progress_interval_s=0)


def _resolver(tmp_path: Path) -> TargetResolver:
    return TargetResolver(CopierSettings(target_root=tmp_path / "replicas"))


async def test_full_copy_of_sparse_odd_sized_disk(tmp_path: Path) -> None:
    image = tmp_path / "src.img"
    make_image(image, SIZE, 1, LAYOUT)
    seen: list[CopyProgress] = []
    with nbdkit(tmp_path, "-r", "file", str(image)) as uri:
        async with open_nbd_source(uri, [f"unix:{tmp_path}/" + uri.split("/")[-1]]) as src:
            pass  # the allow-list accepts the exact socket
        async with NbdSource(parse_nbd_uri(uri)) as src:
            target = _resolver(tmp_path).target_for(KEY, src.size)
            async with target:
                result = await copy_disk(
                    src,
                    target,
                    [Extent(0, SIZE)],
                    capacity=SIZE,
                    options=OPTS,
                    on_progress=seen.append,
                )
                assert result.tree is not None
                await verify_leaves(target, result.tree, result.ranges)  # re-read: no mismatch
    assert Path(target.path).read_bytes() == image.read_bytes()
    assert result.replica_digest == root_of(image.read_bytes())
    assert result.bytes_copied + result.bytes_zeroed == SIZE
    assert result.bytes_zeroed >= 2 * M  # holes were written as zeroes, not read
    assert result.bytes_copied >= 3 * M + 100 + 2 * M + 64 * 1024 + 6 * M + 70000
    assert result.extents == 1 and result.digest.startswith("blake3:")
    assert seen[-1].final and seen[-1].bytes_done == seen[-1].bytes_total == SIZE


async def test_incremental_copy_with_end_of_disk_and_new_holes(tmp_path: Path) -> None:
    old, new = tmp_path / "old.img", tmp_path / "new.img"
    make_image(old, SIZE, 1, LAYOUT)
    make_image(new, SIZE, 2, [(0, SIZE, "data")])
    with new.open("r+b") as f:  # an area that became zeroes (a discarded file in the guest)
        f.seek(12 * M)
        f.write(bytes(3 * M))
    changed = [(4096, 8192), (12 * M - 4096, 3 * M + 8192), (20 * M + 1, 3), (SIZE - 5, 5)]
    changed += [(SIZE - 1, 100)]  # reaches beyond the end: clipped
    target = _resolver(tmp_path).target_for(KEY, SIZE)
    os.pwrite(os.open(target.path, os.O_WRONLY), old.read_bytes(), 0)
    with nbdkit(tmp_path, "-r", "file", str(new)) as uri:
        async with NbdSource(parse_nbd_uri(uri)) as src, target:
            opts = CopyOptions(disk_key=KEY, request_bytes=M, merge_gap_bytes=0, max_in_flight=3)
            base = dg.HashTree.of_leaves(SIZE, dg.MemoryLeaves(bytearray(b"".join(
                leaves_of(old.read_bytes())))))
            result = await copy_disk(
                src, target, [Extent(*e) for e in changed], capacity=SIZE, options=opts,
                tree=base,
            )
    expected = apply(old.read_bytes(), new.read_bytes(), [e for e in changed if e[0] < SIZE])
    assert Path(target.path).read_bytes() == expected
    # the whole-replica digest, maintained from the base tree by rehashing touched leaves only
    # (several changed areas cover a leaf in part: those leaves were read back)
    assert result.replica_digest == root_of(expected)
    assert result.extents == 5
    assert result.bytes_copied + result.bytes_zeroed == 8192 + 3 * M + 8192 + 3 + 5


async def test_merge_gap_copies_the_gap_too(tmp_path: Path) -> None:
    image = tmp_path / "src.img"
    make_image(image, 4 * M, 3, [(0, 4 * M, "data")])
    target = _resolver(tmp_path).target_for(KEY, 4 * M)
    with nbdkit(tmp_path, "-r", "file", str(image)) as uri:
        async with NbdSource(parse_nbd_uri(uri)) as src, target:
            result = await copy_disk(
                src,
                target,
                [Extent(0, 10), Extent(1000, 10)],
                capacity=4 * M,
                options=CopyOptions(merge_gap_bytes=4096),
            )
    assert result.bytes_copied == 1010
    assert Path(target.path).read_bytes()[:1010] == image.read_bytes()[:1010]


async def test_nbd_target_and_verify(tmp_path: Path) -> None:
    image = tmp_path / "src.img"
    make_image(image, SIZE, 4, LAYOUT)
    with (
        nbdkit(tmp_path, "-r", "file", str(image)) as src_uri,
        nbdkit(tmp_path, "memory", str(SIZE)) as dst_uri,
    ):
        async with (
            NbdSource(parse_nbd_uri(src_uri)) as src,
            NbdTarget(parse_nbd_uri(dst_uri)) as dst,
        ):
            result = await copy_disk(
                src,
                dst,
                [Extent(0, SIZE)],
                capacity=SIZE,
                options=CopyOptions(request_bytes=4 * M, verify=True),
            )
            back = await dst.client.read(0, SIZE)
    assert result.verified and back == image.read_bytes()


async def test_server_error_fails_the_copy_and_claims_nothing(tmp_path: Path) -> None:
    image = tmp_path / "src.img"
    make_image(image, 8 * M, 5, [(0, 8 * M, "data")])
    sync_id = str(uuid.uuid4())
    cp = Checkpoint(tmp_path / "state", KEY, sync_id)
    target = _resolver(tmp_path).target_for(KEY, 8 * M)
    args = ("--filter=error", "-r", "file", str(image), "error-pread=EIO", "error-pread-rate=1")
    with nbdkit(tmp_path, *args) as uri:
        async with NbdSource(parse_nbd_uri(uri)) as src, target:
            with pytest.raises(CopyFailed) as info:
                await copy_disk(
                    src,
                    target,
                    [Extent(0, 8 * M)],
                    capacity=8 * M,
                    options=CopyOptions(checkpoint_interval_bytes=M, checkpoint_interval_s=0),
                    checkpoint=cp,
                )
    assert info.value.reason == "nbd_server_error"
    assert "EIO" in str(info.value)
    assert not cp.path.exists()  # no offset was ever claimed durable


async def test_unlisted_endpoint_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PermissionDenied):
        async with open_nbd_source("nbd://127.0.0.1:1/", ["10.0.0.1", "127.0.0.1:2"]):
            pass


async def test_several_disks_at_once(tmp_path: Path) -> None:
    images = []
    for i in range(3):
        image = tmp_path / f"d{i}.img"
        make_image(image, 6 * M + i, 10 + i, [(0, 6 * M + i, "data")])
        images.append(image)
    resolver = _resolver(tmp_path)
    with (
        nbdkit(tmp_path, "-r", "file", str(images[0])) as u0,
        nbdkit(tmp_path, "-r", "file", str(images[1])) as u1,
        nbdkit(tmp_path, "-r", "file", str(images[2])) as u2,
    ):
        sources = [NbdSource(parse_nbd_uri(u)) for u in (u0, u1, u2)]
        for s in sources:
            await s.start()
        try:
            jobs = [
                DiskJob(
                    f"{VM}/disk-{i}",
                    s,
                    resolver.target_for(f"{VM}/disk-{i}", s.size),
                    [Extent(0, s.size)],
                    s.size,
                )
                for i, s in enumerate(sources)
            ]
            results = await copy_disks(jobs, CopyOptions(verify=True), max_parallel=2)
        finally:
            for s in sources:
                await s.stop()
            for j in jobs:
                await j.target.stop()  # type: ignore[attr-defined]
    for i, image in enumerate(images):
        r = results[f"{VM}/disk-{i}"]
        assert not isinstance(r, Exception) and r.verified
        assert Path(resolver.path_for(f"{VM}/disk-{i}")).read_bytes() == image.read_bytes()


_CHILD = """
import asyncio, sys
from cbtstream.config import CopierSettings
from cbtstream.extents import Extent
from consumers.copy.checkpoint import Checkpoint
from consumers.copy.engine import CopyOptions, copy_disk
from consumers.copy.sources import NbdSource
from consumers.replica.location import TargetResolver
from consumers.nbd.uri import parse_nbd_uri

async def main(uri, root, state, key, sync_id, size):
    target = TargetResolver(CopierSettings(target_root=root)).target_for(key, size)
    async with NbdSource(parse_nbd_uri(uri)) as src:
        await copy_disk(src, target, [Extent(0, size)], capacity=size,
            options=CopyOptions(request_bytes=1 << 20, max_in_flight=2,
                                checkpoint_interval_bytes=1 << 20, checkpoint_interval_s=0),
            checkpoint=Checkpoint(state, key, sync_id))
    print("finished")

a = sys.argv[1:]
asyncio.run(main(a[0], a[1], a[2], a[3], a[4], int(a[5])))
"""


@pytest.mark.slow
async def test_resume_after_kill(tmp_path: Path) -> None:
    size = 40 * M + 12345
    image = tmp_path / "src.img"
    make_image(image, size, 7, [(0, 20 * M, "data"), (26 * M, size - 26 * M, "data")])
    sync_id, state = str(uuid.uuid4()), tmp_path / "state"
    cp = Checkpoint(state, KEY, sync_id)
    root = tmp_path / "replicas"
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    slow = ("--filter=delay", "-r", "file", str(image), "rdelay=40ms")
    with nbdkit(tmp_path, *slow) as uri:
        child = subprocess.Popen(
            [sys.executable, str(script), uri, str(root), str(state), KEY, sync_id, str(size)],
            stdout=subprocess.PIPE,
        )
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if cp.path.exists() and json.loads(cp.path.read_text())["durable_until"] >= 4 * M:
                    break
                await asyncio.sleep(0.02)
            child.send_signal(signal.SIGKILL)
        finally:
            child.wait()
            assert child.stdout is not None
            assert b"finished" not in child.stdout.read()
            child.stdout.close()
    saved = json.loads(cp.path.read_text())["durable_until"]
    assert 4 * M <= saved < size
    target = TargetResolver(CopierSettings(target_root=root)).target_for(KEY, size)
    with nbdkit(tmp_path, "-r", "file", str(image)) as uri:
        async with NbdSource(parse_nbd_uri(uri)) as src, target:
            resumed = await copy_disk(
                src,
                target,
                [Extent(0, size)],
                capacity=size,
                options=CopyOptions(request_bytes=M),
                checkpoint=cp,
            )
            fresh_target = TargetResolver(
                CopierSettings(target_root=tmp_path / "fresh")
            ).target_for(KEY, size)
            async with fresh_target:
                fresh = await copy_disk(
                    src,
                    fresh_target,
                    [Extent(0, size)],
                    capacity=size,
                    options=CopyOptions(request_bytes=4 * M),
                )
    assert resumed.resumed_from >= saved
    assert Path(target.path).read_bytes() == image.read_bytes()
    assert resumed.digest == fresh.digest  # resuming does not change what the sync wrote
    assert resumed.replica_digest == fresh.replica_digest == root_of(image.read_bytes())
    assert resumed.bytes_copied + resumed.bytes_zeroed >= size
    cp.done()
    assert not cp.path.exists()
