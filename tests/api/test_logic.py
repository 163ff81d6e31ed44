"""The API's pure logic, without a worker."""

from __future__ import annotations

from schemas import DiskRef
from streams.api import authorized, changeid_answer
from streams.state import DiskState

VM = "50bbbbbb-0000-4000-8000-000000000002"


def row(key: int, change: str | None, path: str = "/DC/vm/pg", vm: str = VM) -> DiskState:
    disk = DiskRef(vm_instance_uuid=vm, vm_path=path, vm_name="pg", device_key=key,
                   backing_file=f"[ds] pg_{key}.vmdk", capacity_bytes=1 << 20)
    return DiskState(disk=disk, change_id=change)


def test_disk_id_selects_its_own_disk_only() -> None:
    rows = [row(2001, "52 00 00 00 00 00 00 01-00 00 00 00 00 00 00 00/5"),
            row(2000, "52 00 00 00 00 00 00 00-00 00 00 00 00 00 00 00/3")]
    a = changeid_answer(rows, "/DC/vm/pg", "disk-2000")
    assert a.status == 200 and a.body["change_id"].endswith("00/3")
    a = changeid_answer(rows, "/DC/vm/pg", None)
    assert a.status == 409 and a.body["disk_ids"] == ["disk-2000", "disk-2001"]


def test_disk_without_commit_is_no_previous() -> None:
    a = changeid_answer([row(2000, None)], "/DC/vm/pg", None)
    assert a.status == 200 and a.body["change_id"] == ""
    assert a.body["message"] == "No previous successful migration found"


def test_missing_path() -> None:
    assert changeid_answer([], None, "disk-1").status == 400
    assert changeid_answer([], "", None).status == 400


def test_authorized() -> None:
    assert authorized(None, None)
    assert authorized("anything", None)
    assert authorized("Bearer tok", "tok")
    assert not authorized(None, "tok")
    assert not authorized("Bearer tok2", "tok")
    assert not authorized("tok", "tok")
