"""The figures of ``cbtstream bench site`` from the events it observed. Pure: no I/O.

A *cycle* is one round of guest writes followed by the first commit of every disk whose
snapshot was taken after the writes ended (the scheduler's next slot, or a later one if the VM
was still being copied). Seeding is the first commit of every disk. A *recopy* is a full copy
of a disk after its first commit: after seeding there must be none.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

from schemas.events import ChangeIdCommitted, ReplicationType, SnapshotTaken, SyncPlanned


def percentile(xs: list[float], q: float) -> float:
    """The ``q`` quantile of ``xs`` (nearest rank; NaN for no values)."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


@dataclass
class Observed:
    """What the bench read from the topics, indexed for the figures."""

    #: (disk key, vm snapshot) -> when that snapshot was taken.
    taken: dict[tuple[str, str], datetime] = field(default_factory=dict)
    #: disk key -> its commits, in the order read.
    commits: dict[str, list[ChangeIdCommitted]] = field(default_factory=dict)
    failures: Counter[str] = field(default_factory=Counter)
    schedule: Counter[str] = field(default_factory=Counter)
    #: disk key -> ``vm snapshot/sync id`` of its plans, in the order read (for a diagnosis).
    plans: dict[str, list[str]] = field(default_factory=dict)
    #: disk key -> ``reason vm snapshot`` of its failures, in the order read.
    failed: dict[str, list[str]] = field(default_factory=dict)

    def add_snapshot(self, ev: SnapshotTaken) -> None:
        self.taken[(ev.disk.key, ev.vm_snapshot)] = ev.taken_at

    def add_commit(self, ev: ChangeIdCommitted) -> None:
        mine = self.commits.setdefault(ev.disk.key, [])
        if all(c.event_id != ev.event_id for c in mine):  # a republished commit: once
            mine.append(ev)

    def add_plan(self, ev: SyncPlanned) -> None:
        self.plans.setdefault(ev.disk.key, []).append(f"{ev.vm_snapshot}/{ev.sync_id}")

    def snapshot_time(self, commit: ChangeIdCommitted) -> datetime | None:
        return self.taken.get((commit.disk.key, commit.vm_snapshot))

    def first_commit_after(self, disk: str, after: datetime) -> ChangeIdCommitted | None:
        """The disk's first commit of a snapshot taken after ``after``."""
        for c in self.commits.get(disk, ()):
            t = self.snapshot_time(c)
            if t is not None and t > after:
                return c
        return None

    def story(self, disk: str, after: datetime) -> str:
        """What was seen of ``disk`` around ``after`` (the diagnosis of a disk a cycle waits
        for): its snapshots taken after it, its last plans, commits and failures."""
        snaps = sorted((t, s) for (d, s), t in self.taken.items() if d == disk and t > after)
        commits = [f"{c.vm_snapshot}/{c.sync_id} at {c.occurred_at.isoformat()}"
                   for c in self.commits.get(disk, ())[-2:]]
        return (f"{disk}: snapshots after {after.isoformat()}: "
                f"{[f'{s} at {t.isoformat()}' for t, s in snaps]}; "
                f"plans {self.plans.get(disk, [])[-3:]}; commits {commits}; "
                f"failures {self.failed.get(disk, [])[-3:]}")

    def seeded(self, disks: Iterable[str]) -> bool:
        return all(self.commits.get(d) for d in disks)

    def latency_s(self, commit: ChangeIdCommitted) -> float:
        t = self.snapshot_time(commit)
        return float("nan") if t is None else (commit.occurred_at - t).total_seconds()

    def recopies_after_seeding(self) -> int:
        """Full copies of disks after their first commit."""
        return sum(1 for cs in self.commits.values() for c in cs[1:]
                   if c.replication_type == ReplicationType.FULL)

    def bytes_copied(self) -> int:
        return sum(c.bytes_copied for cs in self.commits.values() for c in cs)


@dataclass(frozen=True)
class CycleFigures:
    """Snapshot-to-commit seconds of one cycle's commits."""

    cycle: int
    commits: int
    p50_s: float
    p99_s: float
    max_s: float


def cycle_figures(cycle: int, commits: list[ChangeIdCommitted], seen: Observed) -> CycleFigures:
    lat = [seen.latency_s(c) for c in commits]
    return CycleFigures(cycle, len(commits), round(percentile(lat, 0.5), 2),
                        round(percentile(lat, 0.99), 2), round(max(lat, default=float("nan")), 2))
