"""The metrics mapping from events (pure, no I/O): which event feeds which series."""

from __future__ import annotations

import uuid

from prometheus_client.parser import text_string_to_metric_families

from cbtstream.metrics import Metrics
from schemas.events import (
    ChangeIdCommitted,
    FullReason,
    ReplicationType,
    SyncFailed,
    SyncPlanned,
)
from tests.unit.factories import EPOCH_A, disk


def samples(m: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(m.render().decode())
        for s in fam.samples
    }


def commit(reason: FullReason, rtype: ReplicationType) -> ChangeIdCommitted:
    return ChangeIdCommitted(
        disk=disk(), sync_id=uuid.uuid4(), vm_snapshot="snapshot-1", previous_change_id=None,
        change_id=f"{EPOCH_A}/3", replication_type=rtype, reason=reason, bytes_copied=4096,
        bytes_zeroed=512, extents=1, digest="sha256:00", duration_s=2.5)


def test_outcomes_plans_and_fallbacks() -> None:
    m = Metrics()
    m.observe_outcome(commit(FullReason.PREVIOUS_COMMIT, ReplicationType.INCREMENTAL))
    m.observe_outcome(commit(FullReason.BASE_CHANGE_ID_REJECTED, ReplicationType.FULL))
    # an incremental that repaired corrupt edge leaves: a finding, not a full copy
    m.observe_outcome(commit(FullReason.REPLICA_MISMATCH, ReplicationType.INCREMENTAL))
    m.observe_outcome(SyncFailed(disk=disk(), sync_id=uuid.uuid4(), vm_snapshot="snapshot-1",
                                 reason="vsphere_not_found", detail="gone", retriable=False))
    m.observe_plan(SyncPlanned(
        disk=disk(), sync_id=uuid.uuid4(), vm_snapshot="snapshot-2", change_id=f"{EPOCH_A}/4",
        snapshot_event_id=uuid.uuid4(), previous_change_id=None, base_change_id=None,
        replication_type=ReplicationType.FULL, reason=FullReason.EPOCH_CHANGED))
    m.observe_plan(SyncPlanned(
        disk=disk(), sync_id=uuid.uuid4(), vm_snapshot="snapshot-3", change_id=f"{EPOCH_A}/5",
        snapshot_event_id=uuid.uuid4(), previous_change_id=None, base_change_id=None,
        replication_type=ReplicationType.FULL, reason=FullReason.NO_PREVIOUS_COMMIT))
    m.observe_dead_letter("copier")
    s = samples(m)
    assert s[("cbtstream_syncs_total", (("outcome", "committed"), ("reason", "previous_commit"),
                                        ("replication_type", "incremental")))] == 1
    assert s[("cbtstream_syncs_total", (("outcome", "failed"), ("reason", "vsphere_not_found"),
                                        ("replication_type", "")))] == 1
    assert s[("cbtstream_bytes_copied_total", (("replication_type", "full"),))] == 4096
    assert s[("cbtstream_bytes_zeroed_total", (("replication_type", "incremental"),))] == 1024
    assert s[("cbtstream_sync_duration_seconds_count", (("replication_type", "full"),))] == 1
    assert s[("cbtstream_fallbacks_total", (("reason", "base_change_id_rejected"),
                                            ("stage", "copier")))] == 1
    assert s[("cbtstream_fallbacks_total", (("reason", "epoch_changed"),
                                            ("stage", "planner")))] == 1
    assert s[("cbtstream_syncs_total", (("outcome", "committed"), ("reason", "replica_mismatch"),
                                        ("replication_type", "incremental")))] == 1
    assert not any(k[0] == "cbtstream_fallbacks_total" and ("reason", "replica_mismatch") in k[1]
                   for k in s)
    # a first full copy is not a fallback
    assert not any(k[0] == "cbtstream_fallbacks_total" and ("reason", "no_previous_commit") in k[1]
                   for k in s)
    assert s[("cbtstream_dead_letters_total", (("component", "copier"),))] == 1
    assert ("cbtstream_disk_last_commit_timestamp_seconds", (("disk_key", disk().key),)) in s
    # histograms carry no disk label
    assert all("disk_key" not in dict(k[1]) for k in s if "duration" in k[0])


def test_lag_series_are_replaced_per_group() -> None:
    m = Metrics()
    m.set_lag("g1", {("t", 0): 5, ("t", 1): 0})
    m.set_lag("g2", {("u", 0): 2})
    m.set_lag("g1", {("t", 1): 3})  # partition 0 revoked
    s = samples(m)
    lag = {k: v for k, v in s.items() if k[0] == "cbtstream_consumer_lag"}
    assert lag == {
        ("cbtstream_consumer_lag", (("group", "g1"), ("partition", "1"), ("topic", "t"))): 3,
        ("cbtstream_consumer_lag", (("group", "g2"), ("partition", "0"), ("topic", "u"))): 2,
    }


def test_read_amplification_from_commits_that_count_it() -> None:
    m = Metrics()
    base = commit(FullReason.PREVIOUS_COMMIT, ReplicationType.INCREMENTAL)
    m.observe_outcome(base.model_copy(update={"bytes_read": 110, "bytes_changed": 100}))
    m.observe_outcome(base.model_copy(update={"bytes_read": 300, "bytes_changed": 100}))
    m.observe_outcome(base)  # an older copier's commit: not counted, not a ratio of zero
    s = samples(m)
    incr = (("replication_type", "incremental"),)
    assert s[("cbtstream_source_read_bytes_total", incr)] == 410
    assert s[("cbtstream_changed_bytes_total", incr)] == 200
    assert s[("cbtstream_read_amplification_count", incr)] == 2
    assert s[("cbtstream_read_amplification_bucket", (("le", "1.2"), *incr))] == 1
    assert s[("cbtstream_read_amplification_bucket", (("le", "3.0"), *incr))] == 2
