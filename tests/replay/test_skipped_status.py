"""``cbtstream status`` (the replay) shows disks that snapshots do not capture."""

from __future__ import annotations

from cbtctl.replay.lineage import replay
from cbtctl.replay.render import status_json
from cbtctl.replay.status import disk_status
from schemas.events import DiskSkipped, SkipReason
from tests.replay.history import History
from tests.unit.factories import EPOCH_A, T0, disk, snap


def skipped(key: int, reason: SkipReason) -> DiskSkipped:
    return DiskSkipped(disk=disk(key), vcenter="vc", vm_snapshot="snapshot-1", reason=reason,
                       taken_at=T0)


def test_skipped_disk_shows_as_skipped_with_its_reason() -> None:
    h = History()
    h.cycle(disk(2000), f"{EPOCH_A}/1")
    h.append(skipped(2001, SkipReason.PHYSICAL_RDM))
    result = replay(h.records, complete=True)
    rows = {d.key: disk_status(d) for d in result.disks.values()}
    assert rows[disk(2000).key].state == "synced"
    rdm = rows[disk(2001).key]
    assert (rdm.state, rdm.skipped, rdm.change_id) == ("skipped", "physical_rdm", None)
    [doc] = [j for j in status_json([rdm], []) if j["type"] == "status"]
    assert doc["state"] == "skipped" and doc["skipped"] == "physical_rdm"


def test_disk_captured_again_is_no_longer_skipped() -> None:
    h = History()
    h.append(skipped(2001, SkipReason.INDEPENDENT_PERSISTENT))
    h.append(snap(disk(2001), f"{EPOCH_A}/1", snapshot="snapshot-2"))
    [lin] = replay(h.records, complete=True).disks.values()
    assert disk_status(lin).skipped is None
