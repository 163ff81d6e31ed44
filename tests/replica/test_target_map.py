"""The operator's target map: which target a disk key resolves to, and what is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from cbtstream.config import CopierSettings, TargetMapping
from cbtstream.errors import PermissionDenied
from consumers.replica.location import TargetResolver
from consumers.replica.state import TargetKind

VM = "5012abcd-1111-2222-3333-444455556666"
KEY = f"{VM}/disk-2000"


def _resolver(tmp_path: Path, *maps: TargetMapping, **kw: object) -> TargetResolver:
    return TargetResolver(CopierSettings(target_root=tmp_path / "r", state_dir=tmp_path / "s",
                                         targets=maps, **kw))  # type: ignore[arg-type]


def test_unmapped_disks_keep_the_default_file(tmp_path: Path) -> None:
    loc = _resolver(tmp_path).locate(KEY)
    assert loc.kind == TargetKind.FILE
    assert loc.location == str(tmp_path / "r" / VM / "disk-2000.img")
    assert loc.store.directory == tmp_path / "r" / VM  # the record sits beside the replica


def test_per_disk_wins_over_per_vm_and_templates_expand(tmp_path: Path) -> None:
    r = _resolver(
        tmp_path,
        TargetMapping(vm=VM, device="/dev/disk/by-id/vol-{device_key}"),
        TargetMapping(disk=f"{VM}/disk-2001", file="volumes/{vm}-{disk_id}.raw"),
        device_allow=("/dev/disk/by-id/*",),
    )
    dev = r.locate(KEY)
    assert (dev.kind, dev.location) == (TargetKind.BLOCK, "/dev/disk/by-id/vol-2000")
    assert dev.store.directory == tmp_path / "s" / "targets"
    f = r.locate(f"{VM}/disk-2001")
    assert f.location == str(tmp_path / "r" / "volumes" / f"{VM}-disk-2001.raw")


@pytest.mark.parametrize("mapping", [
    TargetMapping(disk=KEY, device="/dev/sda"),  # not in device_allow
    TargetMapping(disk=KEY, file="../outside.img"),
    TargetMapping(disk=KEY, file="/etc/passwd"),
    TargetMapping(disk=KEY, nbd="nbd://10.1.2.3:10809/x"),  # not in nbd_allow
])
def test_mappings_outside_the_configuration_are_refused(tmp_path: Path,
                                                        mapping: TargetMapping) -> None:
    with pytest.raises(PermissionDenied):
        _resolver(tmp_path, mapping, device_allow=("/dev/loop*",)).locate(KEY)


def test_mapping_shapes_are_validated() -> None:
    with pytest.raises(ValueError):
        TargetMapping(disk=KEY)
    with pytest.raises(ValueError):
        TargetMapping(disk=KEY, vm=VM, file="x")
    with pytest.raises(ValueError):
        TargetMapping(vm=VM, device="/dev/loop0")  # every disk of the VM onto one device
