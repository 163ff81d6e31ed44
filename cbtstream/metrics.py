"""The metrics registry of a cbtstream process: every metric's name, labels and meaning.

Each process builds one :class:`Metrics` with its own registry (no global state, so tests can
run several in one interpreter) and records **events at the edges**: the copier after an outcome
is published (``consumers.metered.MeteredPublisher``), the planner after a decision is sent
(``streams.metrics``), both when a record is dead-lettered. Pure modules (planner, engine,
guard) know nothing of metrics. :mod:`cbtstream.metrics_http` serves a registry over HTTP.

Metric names (all ``cbtstream_``-prefixed):

``cbtstream_syncs_total{outcome,replication_type,reason}``        finished syncs (copier)
``cbtstream_syncs_planned_total{replication_type,reason}``        planned syncs (planner)
``cbtstream_fallbacks_total{stage,reason}``                       full copies where an
    incremental was expected: ``stage=planner`` (lineage check: epoch, sequence, backing,
    capacity) or ``stage=copier`` (vSphere rejected the base change ID, or the allocated areas)
``cbtstream_bytes_copied_total{replication_type}``, ``cbtstream_bytes_zeroed_total{...}``
``cbtstream_sync_duration_seconds{replication_type}``             histogram, no disk label
``cbtstream_source_read_bytes_total{replication_type}``, ``cbtstream_changed_bytes_total{...}``
    bytes read from the snapshots and bytes in the changed areas (commits that carry them):
    ``rate(read) / rate(changed)`` is the read amplification of the merge gap
``cbtstream_read_amplification{replication_type}``                 histogram: per sync, bytes
    read / bytes changed (1: nothing read beyond the changes; below 1: zeroes not read)
``cbtstream_dead_letters_total{component}``
``cbtstream_consumer_lag{group,topic,partition}``                 records behind the end
``cbtstream_disk_last_commit_timestamp_seconds{disk_key}``        one series per disk: fine
    for thousands of disks, and the one per-disk signal an alert needs ("disk not synced in N h")
``cbtstream_copies{state}``                                        the copier's plans held now:
    ``queued`` (held, not started) and ``running`` (copying), read at each scrape
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from schemas.events import (
    ChangeIdCommitted,
    FullReason,
    ReplicaMismatch,
    ReplicationType,
    ReplicaVerified,
    SyncFailed,
    SyncPlanned,
)

CONTENT_TYPE = CONTENT_TYPE_LATEST

#: Sync durations span seconds (a few changed blocks) to hours (a first full copy of a TiB disk).
DURATION_BUCKETS = (1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 12 * 3600, float("inf"))

#: Read amplification: 1.2 is the bound kept for scattered 64 KiB changes (the merge gap's
#: choice, ``copier.merge_gap_bytes``); above 2 a sync reads more gaps than changes.
AMPLIFICATION_BUCKETS = (0.5, 1, 1.05, 1.1, 1.2, 1.5, 2, 3, 5, float("inf"))

#: Full-copy reasons decided by the copier: vSphere refused the incremental path, or the replica
#: guard found that the replica does not provably hold the plan's base.
COPIER_FALLBACKS = frozenset({FullReason.BASE_CHANGE_ID_REJECTED,
                              FullReason.ALLOCATED_AREAS_FAILED,
                              FullReason.REPLICA_MISSING, FullReason.REPLICA_REPLACED,
                              FullReason.REPLICA_NOT_AT_BASE, FullReason.REPLICA_STATE_UNKNOWN,
                              FullReason.REPLICA_MISMATCH})
#: Full-copy reasons that are not a fallback: there was nothing to be incremental from.
NOT_A_FALLBACK = frozenset({FullReason.NO_PREVIOUS_COMMIT, FullReason.PREVIOUS_COMMIT})


class Metrics:
    """Every metric of one process, in a private registry."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.syncs = Counter("cbtstream_syncs", "Finished syncs by outcome, type and reason.",
                             ["outcome", "replication_type", "reason"], registry=r)
        self.planned = Counter("cbtstream_syncs_planned", "Syncs planned, by type and reason.",
                               ["replication_type", "reason"], registry=r)
        self.fallbacks = Counter(
            "cbtstream_fallbacks",
            "Full copies where an incremental one was expected, by deciding stage and reason.",
            ["stage", "reason"], registry=r)
        self.bytes_copied = Counter("cbtstream_bytes_copied", "Bytes read and written.",
                                    ["replication_type"], registry=r)
        self.bytes_zeroed = Counter("cbtstream_bytes_zeroed", "Bytes zeroed on replicas.",
                                    ["replication_type"], registry=r)
        self.duration = Histogram("cbtstream_sync_duration_seconds",
                                  "Duration of committed syncs.", ["replication_type"],
                                  buckets=DURATION_BUCKETS, registry=r)
        self.source_read = Counter("cbtstream_source_read_bytes", "Bytes read from snapshots "
                                   "by committed syncs.", ["replication_type"], registry=r)
        self.changed = Counter("cbtstream_changed_bytes", "Bytes in the changed areas of "
                               "committed syncs.", ["replication_type"], registry=r)
        self.read_amplification = Histogram(
            "cbtstream_read_amplification", "Per committed sync: bytes read from the snapshot "
            "/ bytes in its changed areas.", ["replication_type"],
            buckets=AMPLIFICATION_BUCKETS, registry=r)
        self.dead_letters = Counter("cbtstream_dead_letters", "Records sent to the dead letter "
                                    "topic.", ["component"], registry=r)
        self.lag = Gauge("cbtstream_consumer_lag", "Records between the committed offset and "
                         "the end of the partition.", ["group", "topic", "partition"],
                         registry=r)
        self.replica_checks = Counter("cbtstream_replica_checks", "Replicas re-hashed by "
                                      "verify, by result (verified, mismatch).", ["result"],
                                      registry=r)
        self.last_commit = Gauge("cbtstream_disk_last_commit_timestamp_seconds",
                                 "When the disk's last change ID was committed (Unix time).",
                                 ["disk_key"], registry=r)
        self.copies = Gauge("cbtstream_copies", "Plans the copier holds, by state: queued "
                            "(held, not started) or running (copying).", ["state"], registry=r)

    # -- recording ------------------------------------------------------------------------------
    def observe_outcome(self, event: BaseModel) -> None:
        """A copier outcome was published (other events are ignored)."""
        if isinstance(event, ChangeIdCommitted):
            rtype = str(event.replication_type)
            self.syncs.labels("committed", rtype, str(event.reason)).inc()
            self.bytes_copied.labels(rtype).inc(event.bytes_copied)
            self.bytes_zeroed.labels(rtype).inc(event.bytes_zeroed)
            self.duration.labels(rtype).observe(event.duration_s)
            if event.bytes_read is not None and event.bytes_changed is not None:
                self.source_read.labels(rtype).inc(event.bytes_read)
                self.changed.labels(rtype).inc(event.bytes_changed)
                if event.bytes_changed:
                    self.read_amplification.labels(rtype).observe(
                        event.bytes_read / event.bytes_changed)
            self.last_commit.labels(event.disk.key).set(time.time())
            # an incremental commit with replica_mismatch repaired leaves it rewrote in part
            # (consumers/copy/engine.py, "Edge leaves"): no full copy, so no fallback
            if event.reason in COPIER_FALLBACKS and rtype == ReplicationType.FULL:
                self.fallbacks.labels("copier", str(event.reason)).inc()
        elif isinstance(event, SyncFailed):
            self.syncs.labels("failed", "", event.reason).inc()
        elif isinstance(event, ReplicaVerified | ReplicaMismatch):
            self.replica_checks.labels(
                "verified" if isinstance(event, ReplicaVerified) else "mismatch").inc()

    def observe_plan(self, plan: SyncPlanned) -> None:
        """The planner decided a sync."""
        self.observe_plan_fields(plan.replication_type, plan.reason)

    def observe_plan_fields(self, replication_type: ReplicationType, reason: FullReason) -> None:
        """:meth:`observe_plan` from the two fields it reads (the worker's sensor reads them
        from the record it sends, without validating the whole event again)."""
        self.planned.labels(str(replication_type), str(reason)).inc()
        if replication_type == ReplicationType.FULL and reason not in NOT_A_FALLBACK:
            self.fallbacks.labels("planner", str(reason)).inc()

    def count_copies(self, queued: Callable[[], int], running: Callable[[], int]) -> None:
        """Read the copier's queued and running copies at each scrape (both series exist from
        the start, at 0, so a rule can tell "none" from "not reported")."""
        self.copies.labels("queued").set_function(queued)
        self.copies.labels("running").set_function(running)

    def observe_dead_letter(self, component: str) -> None:
        self.dead_letters.labels(component).inc()

    def set_lag(self, group: str, lags: Mapping[tuple[str, int], int]) -> None:
        """Replace the group's lag series with ``{(topic, partition): lag}`` (revoked
        partitions disappear)."""
        for labels in list(self._lag_series(group)):
            self.lag.remove(*labels)
        for (topic, partition), value in lags.items():
            self.lag.labels(group, topic, str(partition)).set(max(0, value))

    def _lag_series(self, group: str) -> list[tuple[str, ...]]:
        return [
            (s.labels["group"], s.labels["topic"], s.labels["partition"])
            for metric in self.lag.collect() for s in metric.samples
            if s.labels.get("group") == group
        ]

    def render(self) -> bytes:
        """The text exposition format (``CONTENT_TYPE``)."""
        return generate_latest(self.registry)


#: Scheduler cycles take seconds (a few snapshots) to the whole interval (an overrun).
CYCLE_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 900, 3600, float("inf"))


class ScheduleMetrics(Metrics):
    """The site scheduler's metrics (``cbtstream schedule``), in the process's registry:

    ``cbtstream_schedule_snapshots_total{policy,outcome}``   snapshots taken / failed
    ``cbtstream_schedule_rpo_at_risk_total{policy}``         VMs due but still being copied
    ``cbtstream_schedule_rpo_missed_total{policy}``          RPO misses reported (once a point)
    ``cbtstream_schedule_descriptions_failed_total{policy}`` snapshots taken whose VM
        description could not be read (their disk events published without a ``VmDescribed``)
    ``cbtstream_schedule_vms{policy,state}``                 VMs this scheduler owns now, by
        state: ``protected`` (all it owns), ``at_risk``, ``missed`` (as of the last cycle)
    ``cbtstream_schedule_policy_problems{policy,kind}``     problems of the last cycle
    ``cbtstream_schedule_cycle_seconds``                     histogram of cycle durations
    ``cbtstream_schedule_last_cycle_timestamp_seconds``      end of the last cycle (Unix time)
    """

    def __init__(self) -> None:
        super().__init__()
        r = self.registry
        self.schedule_snapshots = Counter(
            "cbtstream_schedule_snapshots", "Snapshots the scheduler took (outcome taken) or "
            "failed to take (outcome failed), by policy.", ["policy", "outcome"], registry=r)
        self.schedule_at_risk = Counter(
            "cbtstream_schedule_rpo_at_risk", "VMs due for a snapshot whose previous one was "
            "still being copied (not snapshotted again).", ["policy"], registry=r)
        self.schedule_missed = Counter(
            "cbtstream_schedule_rpo_missed", "RPO misses reported (RpoMissed events).",
            ["policy"], registry=r)
        self.schedule_undescribed = Counter(
            "cbtstream_schedule_descriptions_failed", "Snapshots taken whose VM description "
            "could not be read (disk events published without VmDescribed), by policy.",
            ["policy"], registry=r)
        self.schedule_vms = Gauge(
            "cbtstream_schedule_vms", "VMs this scheduler owns, by policy and state "
            "(protected: all, at_risk, missed) as of its last cycle.", ["policy", "state"],
            registry=r)
        self.schedule_problems = Gauge(
            "cbtstream_schedule_policy_problems", "Problems with the policies found by the last "
            "cycle (no_match, missing_folder, missing_cluster, missing_tag, missing_vm, "
            "conflict).", ["policy", "kind"], registry=r)
        self.schedule_cycle = Histogram(
            "cbtstream_schedule_cycle_seconds", "Duration of scheduler cycles.",
            buckets=CYCLE_BUCKETS, registry=r)
        self.schedule_last_cycle = Gauge(
            "cbtstream_schedule_last_cycle_timestamp_seconds", "When the last cycle ended.",
            registry=r)

    def set_cycle(self, vms: Mapping[tuple[str, str], int],
                  problems: Mapping[tuple[str, str], int], duration_s: float) -> None:
        """Replace the per-cycle gauges (series of policies gone drop out)."""
        self.schedule_vms.clear()
        for (policy, state), n in vms.items():
            self.schedule_vms.labels(policy, state).set(n)
        self.schedule_problems.clear()
        for (policy, kind), n in problems.items():
            self.schedule_problems.labels(policy, kind).set(n)
        self.schedule_cycle.observe(duration_s)
        self.schedule_last_cycle.set(time.time())
