"""Change-ID fences: the pure rule (streams/fence.py) and the planner's use of it."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest

from schemas import FullReason, ReplicationType, SyncPlanned
from schemas.events import ChangeIdFence, FenceScope
from streams.fence import covers, fence_for, trusted, vcenter_name
from streams.planner import on_commit, on_snapshot
from tests.unit.factories import EPOCH_A, T0, VM, commit_for, disk, snap


def fence(scope: FenceScope, target: str | None, before_minutes: int, *,
          revoked: bool = False) -> ChangeIdFence:
    before = T0 + timedelta(minutes=before_minutes)
    return ChangeIdFence(fence_id=uuid.uuid4(), scope=scope, target=target, before=before,
                         reason="KB 317933", revoked=revoked,
                         occurred_at=before + timedelta(days=1))


def on_host(minutes: int, change_id: str, host: str | None = "esx1.example") -> object:
    return snap(disk(), change_id, minutes=minutes).model_copy(update={"esxi_host": host})


@pytest.mark.parametrize(("scope", "target", "hit"), [
    (FenceScope.ALL, None, True),
    (FenceScope.VM, VM.upper(), True),
    (FenceScope.VM, "/DC/vm/pgtest1", True),
    (FenceScope.VM, "pgtest1", True),
    (FenceScope.VM, "other", False),
    (FenceScope.HOST, "ESX1.example", True),
    (FenceScope.HOST, "esx2.example", False),
    (FenceScope.VCENTER, "https://vc/sdk", True),
    (FenceScope.VCENTER, "vc:443", True),
    (FenceScope.VCENTER, "vc:8443", False),
])
def test_scopes(scope: FenceScope, target: str | None, hit: bool) -> None:
    s = on_host(10, f"{EPOCH_A}/6")
    assert covers(fence(scope, target, 5), s) is hit  # type: ignore[arg-type]


def test_time_and_revocation() -> None:
    s = on_host(60, f"{EPOCH_A}/6")
    f = fence(FenceScope.ALL, None, 30)
    assert fence_for([f], T0 + timedelta(minutes=29), s) is f  # type: ignore[arg-type]
    assert fence_for([f], T0 + timedelta(minutes=30), s) is None  # type: ignore[arg-type]
    assert fence_for([f], None, s) is None  # type: ignore[arg-type]
    revoked = f.model_copy(update={"revoked": True})
    assert trusted([revoked], T0, s) == (True, "")  # type: ignore[arg-type]
    ok, why = trusted([f], T0, s)  # type: ignore[arg-type]
    assert not ok and "KB 317933" in why and str(f.fence_id) in why


def test_host_fence_needs_the_host() -> None:
    s = on_host(60, f"{EPOCH_A}/6", host=None)
    assert fence_for([fence(FenceScope.HOST, "esx1.example", 30)], T0, s) is None  # type: ignore[arg-type]


def test_fence_validation() -> None:
    with pytest.raises(ValueError, match="target"):
        ChangeIdFence(fence_id=uuid.uuid4(), scope=FenceScope.VM, target=None, before=T0,
                      reason="x")
    with pytest.raises(ValueError, match="future"):
        ChangeIdFence(fence_id=uuid.uuid4(), scope=FenceScope.ALL, before=T0 + timedelta(
            days=3650), reason="x")
    assert vcenter_name("HTTPS://VC.example:443/sdk") == "vc.example"


def test_planner_full_fenced_once_then_incremental() -> None:
    d = disk()
    state, out = on_snapshot(None, snap(d, f"{EPOCH_A}/1", minutes=0), T0)
    plan = out[0]
    assert isinstance(plan, SyncPlanned)
    state, _ = on_commit(state, commit_for(plan), T0)
    assert state is not None
    fences = [fence(FenceScope.VM, VM, 30)]
    # The committed change ID (snapshot at minute 0) predates the fence's time (minute 30).
    state, out = on_snapshot(state, snap(d, f"{EPOCH_A}/2", minutes=60, snapshot="s2"), T0,
                             fences)
    fenced = out[0]
    assert isinstance(fenced, SyncPlanned)
    assert (fenced.replication_type, fenced.reason) == (ReplicationType.FULL, FullReason.FENCED)
    assert fenced.base_change_id is None and fenced.previous_change_id == f"{EPOCH_A}/1"
    state, _ = on_commit(state, commit_for(fenced), T0)
    # The new commit is from minute 60, after the fence: trusted again.
    state, out = on_snapshot(state, snap(d, f"{EPOCH_A}/3", minutes=90, snapshot="s3"), T0,
                             fences)
    again = out[0]
    assert isinstance(again, SyncPlanned)
    assert again.replication_type == ReplicationType.INCREMENTAL
    # Without fences the same history plans incrementally: the fence alone made it full.
    s0, o0 = on_snapshot(None, snap(d, f"{EPOCH_A}/1"), T0)
    s0, _ = on_commit(s0, commit_for(o0[0]), T0)  # type: ignore[arg-type]
    _, o1 = on_snapshot(s0, snap(d, f"{EPOCH_A}/2", minutes=60, snapshot="s2"), T0)
    assert o1[0].replication_type == ReplicationType.INCREMENTAL  # type: ignore[union-attr]


def test_snapshot_without_change_id_is_still_cbt_not_enabled() -> None:
    _, out = on_snapshot(None, snap(disk(), None), T0, [fence(FenceScope.ALL, None, 30)])
    assert out[0].reason == FullReason.CBT_NOT_ENABLED  # type: ignore[union-attr]


def test_upstream_line_without_change_id_plans_full_cbt_not_enabled() -> None:
    """An upstream system's snapshot of a disk without CBT (``change_id: null``) is planned in
    full with reason ``cbt_not_enabled``, also when the disk has a commit."""
    from producers.upstream import parse_line
    from schemas.events import SnapshotTaken

    d = disk()
    later = snap(d, None, minutes=60, snapshot="s2")
    event = parse_line(1, later.model_dump_json(exclude={"event_id"}))
    assert isinstance(event, SnapshotTaken) and event.change_id is None
    s0, o0 = on_snapshot(None, snap(d, f"{EPOCH_A}/1"), T0)
    s0, _ = on_commit(s0, commit_for(o0[0]), T0)  # type: ignore[arg-type]
    _, out = on_snapshot(s0, event, T0)
    assert isinstance(out[0], SyncPlanned)
    assert (out[0].replication_type, out[0].reason) == (ReplicationType.FULL,
                                                        FullReason.CBT_NOT_ENABLED)
