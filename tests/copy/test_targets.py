
"""TargetResolver: replicas only under the target root, never through symlinks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cbtstream.config import CopierSettings
from cbtstream.errors import PermissionDenied
from consumers.copy.targets import TargetError
from consumers.replica.location import TargetResolver

VM = "4211c3d5-7f1e-4b8a-9d6c-0123456789ab"


def _resolver(root: Path) -> TargetResolver:
    return TargetResolver(CopierSettings(target_root=root))


async def test_creates_and_extends(tmp_path: Path) -> None:
    r = _resolver(tmp_path / "replicas")
    t = r.target_for(f"{VM}/disk-2000", 5 << 20)
    assert t.path == str(tmp_path / "replicas" / VM / "disk-2000.img")
    assert t.size == 5 << 20
    await t.stop()
    t = r.target_for(f"{VM}/disk-2000", 7 << 20)
    assert os.path.getsize(t.path) == 7 << 20
    await t.stop()
    with pytest.raises(TargetError, match="larger"):
        r.target_for(f"{VM}/disk-2000", 1 << 20)


@pytest.mark.parametrize(
    "key",
    [
        "../etc/disk-1",
        f"{VM}/../../disk-1",
        f"/{VM}/disk-1",
        f"{VM}/disk-1/../../x",
        f"{VM}/disk-x",
        "not-a-uuid/disk-1",
        f"{VM.upper()}/disk-1",
        "",
    ],
)
def test_refuses_bad_keys(tmp_path: Path, key: str) -> None:
    with pytest.raises(PermissionDenied):
        _resolver(tmp_path).target_for(key, 4096)


def test_refuses_symlinked_vm_dir_and_file(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / VM).symlink_to(outside)
    with pytest.raises(PermissionDenied):
        _resolver(root).target_for(f"{VM}/disk-1", 4096)
    assert list(outside.iterdir()) == []
    (root / VM).unlink()
    (root / VM).mkdir()
    victim = outside / "victim"
    victim.write_bytes(b"precious")
    (root / VM / "disk-1.img").symlink_to(victim)
    with pytest.raises(PermissionDenied):
        _resolver(root).target_for(f"{VM}/disk-1", 4096)
    assert victim.read_bytes() == b"precious"


def test_refuses_non_file(tmp_path: Path) -> None:
    (tmp_path / VM / "disk-1.img").mkdir(parents=True)
    with pytest.raises((PermissionDenied, TargetError)):
        _resolver(tmp_path).target_for(f"{VM}/disk-1", 4096)
