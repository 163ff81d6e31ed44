"""Which plans the copier may start now, and which offsets it may commit: pure bookkeeping.

The copier hands every record it fetches to a :class:`Schedule` and asks it what to start,
what to commit and which partitions to pause. Nothing here awaits or does I/O (one asyncio
thread calls it, so it needs no locks); the rules are tested on their own
(``tests/copier/test_schedule.py``). The design is the key-ordered mode of the Confluent Parallel
Consumer (per-key queues, per-partition tracking of unfinished offsets), written for one event
loop.

**Order per key, not per partition.** Each record has a key (the disk key of a plan) and waits
in its key's queue, in arrival (offset) order. Only the head of a key's queue may run, so a
disk never has two copies at once and a later plan of a disk waits for the earlier one.
Different keys run concurrently even when they share a partition, so one long seeding copy no
longer holds back every disk hashed to its partition.

**Capacity.** At most ``capacity`` works are *running* (copying) at once. A work frees its slot
when its copy ends (:meth:`Schedule.copied`) and its key only when it is *done*
(:meth:`Schedule.done`: its outcome acknowledged), so the outcome of one disk is published
while another disk copies, and a disk's next plan never starts before the previous outcome is
out. When a slot frees, the waiting key head that arrived first starts (oldest first across
partitions, so no partition starves).

**Limited resources.** A work may name resources it holds while it runs, ``(kind, name)`` pairs
(the copier's are the ESXi host and the datastore a copy reads from), and each kind may have a
limit: at most that many running works hold one resource of the kind. The work that starts is
the oldest key head whose resources are all under their limits; a head held back by a limit
does not hold back the heads behind it that need other resources (one busy host never stalls
the others). A head found blocked is *parked* on the first full resource it needs and is looked
at again only when that resource frees (then the oldest parked there competes with the ready
heads by arrival order), so starting a work costs a few heap operations, not a scan of every
waiting work however many wait for a busy host. Resources are held, like the slot, until the
copy ends. :meth:`Schedule.waits_for` says what a waiting work waits for.

**Commits below the lowest unfinished offset (gap-aware).** Per partition the schedule keeps
the offsets of the records it was given that are not done. The commit point is the lowest of
them, or one past the highest offset seen when none is left: an offset is never committed past
a record whose outcome is not acknowledged, however many records above it are done. A commit is
due when the point advanced and either nothing of the partition waits any more or it advanced
by ``commit_every`` records (one broker round trip per batch, not per plan).

**Bounded buffering.** A partition whose waiting works reach ``max_waiting`` is to be paused (its
records stay in Kafka); it resumes once they are down to half of that.

**Revocation** in two steps. :meth:`Schedule.revoke` stops a partition: its waiting works go,
nothing of it is added or started any more, and its running and finishing works are returned
(the copier cancels the running ones and lets the others publish). They stay at the head of
their keys until they end, so no other copy of the same disk starts while a cancelled one
unwinds. :meth:`Schedule.forget` then removes the partition and says what may still be
committed for it.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Generic, TypeVar

P = TypeVar("P", bound=Hashable)
T = TypeVar("T")

#: A resource a running work holds: ``(kind, name)``, e.g. ``("esxi host", "esx-07")``.
Resource = tuple[str, str]


class Stage(StrEnum):
    """Where a work is: waiting for its key and a slot, copying, or publishing its outcome."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHING = "finishing"


@dataclass(eq=False)
class Work(Generic[P, T]):
    """One record to process: its place in Kafka, its ordering key and what to do."""

    partition: P
    offset: int
    key: str
    item: T
    #: Arrival order across every partition (start order and queue positions follow it).
    seq: int
    stage: Stage = Stage.WAITING
    #: Its partition was forgotten: it no longer counts for commits or flow control.
    dropped: bool = False
    #: The limited resources it holds while running (kinds without a limit are left out).
    resources: tuple[Resource, ...] = ()


@dataclass(frozen=True)
class WaitsFor:
    """What a waiting work waits for (:meth:`Schedule.waits_for`)."""

    #: ``"key"``: an earlier work of its key; ``"slot"``: a running slot (capacity); otherwise
    #: the kind of the resource at its limit.
    what: str
    #: The resource's name (with a resource kind).
    name: str = ""
    #: The limit that holds it back: the capacity, or the resource kind's limit.
    limit: int = 0


@dataclass
class _Partition:
    """Offsets given and not done yet (a min-heap with lazy deletion), and flow control."""

    highest: int = -1
    #: The first offset seen: the group's committed offset when the partition was assigned.
    first: int | None = None
    incomplete: set[int] = field(default_factory=set)
    heap: list[int] = field(default_factory=list)
    committed: int | None = None
    waiting: int = 0
    paused: bool = False
    revoked: bool = False

    def lowest_incomplete(self) -> int | None:
        while self.heap and self.heap[0] not in self.incomplete:
            heapq.heappop(self.heap)
        return self.heap[0] if self.heap else None

    def commit_point(self) -> int | None:
        """The offset to commit if it advanced: below the lowest unfinished record, else past
        the highest; None if it did not advance since the last commit (or the assignment)."""
        low = self.lowest_incomplete()
        point = low if low is not None else self.highest + 1
        base = self.committed if self.committed is not None else self.first
        return point if base is not None and point > base else None


class Schedule(Generic[P, T]):
    """Per-key queues, a capacity of running works, and per-partition commit points."""

    def __init__(self, capacity: int, max_waiting: int, commit_every: int,
                 limits: Mapping[str, int] | None = None) -> None:
        """``limits``: running works per resource, by resource kind (0 or absent: no limit)."""
        if capacity < 1 or max_waiting < 1 or commit_every < 1:
            raise ValueError("capacity, max_waiting and commit_every must be positive")
        if any(limit < 0 for limit in (limits or {}).values()):
            raise ValueError("resource limits must be positive (or 0: no limit)")
        self.limits = {kind: n for kind, n in (limits or {}).items() if n > 0}
        self.capacity = capacity
        self.max_waiting = max_waiting
        self.commit_every = commit_every
        self.running = 0
        self._seq = 0
        self._parts: dict[P, _Partition] = {}
        self._keys: dict[str, deque[Work[P, T]]] = {}
        #: (seq, key) of key heads that may be ready to start; checked when popped.
        self._ready: list[tuple[int, str]] = []
        #: Running works per limited resource (absent: none).
        self._in_use: dict[Resource, int] = {}
        #: (seq, key) of key heads found blocked by a full resource, per resource.
        self._parked: dict[Resource, list[tuple[int, str]]] = {}
        #: Resources under their limit with parked heads: those heads may start again.
        self._open: set[Resource] = set()

    # -- input ----------------------------------------------------------------------------------
    def add(self, partition: P, offset: int, key: str, item: T,
            resources: Iterable[Resource] = ()) -> Work[P, T] | None:
        """A fetched record with work to do, holding ``resources`` while it runs. None: an
        offset this partition already had (a record delivered twice is not processed twice)."""
        part = self._part(partition, offset)
        if part.revoked or offset <= part.highest:
            return None
        part.highest = offset
        part.incomplete.add(offset)
        heapq.heappush(part.heap, offset)
        part.waiting += 1
        self._seq += 1
        held = tuple(dict.fromkeys(r for r in resources if r[0] in self.limits))
        work = Work(partition, offset, key, item, self._seq, resources=held)
        queue = self._keys.setdefault(key, deque())
        queue.append(work)
        if len(queue) == 1:
            heapq.heappush(self._ready, (work.seq, key))
        return work

    def passed(self, partition: P, offset: int) -> None:
        """A fetched record with nothing to do (it is done as soon as it is seen)."""
        part = self._part(partition, offset)
        if not part.revoked:
            part.highest = max(part.highest, offset)

    def _part(self, partition: P, offset: int) -> _Partition:
        part = self._parts.get(partition)
        if part is None:
            part = self._parts[partition] = _Partition(first=offset)
        return part

    # -- running --------------------------------------------------------------------------------
    def next(self) -> Work[P, T] | None:
        """The work to start now (and mark running), or None: no slot, or no key head whose
        resources are all under their limits."""
        while self.running < self.capacity:
            entry = self._pop_candidate()
            if entry is None:
                return None
            seq, key = entry
            queue = self._keys.get(key)
            if not queue or queue[0].seq != seq or queue[0].stage != Stage.WAITING:
                continue  # stale entry: the head started, ended or was dropped since
            work = queue[0]
            full = self._full(work)
            if full is not None:  # looked at again when that resource frees
                heapq.heappush(self._parked.setdefault(full, []), entry)
                continue
            work.stage = Stage.RUNNING
            self.running += 1
            for res in work.resources:
                self._in_use[res] = self._in_use.get(res, 0) + 1
                if self._in_use[res] >= self.limits[res[0]]:
                    self._open.discard(res)
            if not work.dropped:
                self._parts[work.partition].waiting -= 1
            return work
        return None

    def _pop_candidate(self) -> tuple[int, str] | None:
        """The oldest entry among the ready heads and the heads parked on resources that
        freed since (removed from its heap), or None."""
        best: tuple[int, str] | None = self._ready[0] if self._ready else None
        source: Resource | None = None
        for res in self._open:
            top = self._parked[res][0]
            if best is None or top < best:
                best, source = top, res
        if source is None:
            return heapq.heappop(self._ready) if best is not None else None
        heap = self._parked[source]
        heapq.heappop(heap)
        if not heap:
            del self._parked[source]
            self._open.discard(source)
        return best

    def _full(self, work: Work[P, T]) -> Resource | None:
        """The first resource ``work`` needs that is at its limit, or None."""
        for res in work.resources:
            if self._in_use.get(res, 0) >= self.limits[res[0]]:
                return res
        return None

    def _stop_running(self, work: Work[P, T]) -> None:
        """``work`` leaves the running stage: its slot and resources are free."""
        self.running -= 1
        for res in work.resources:
            left = self._in_use[res] - 1
            if left:
                self._in_use[res] = left
            else:
                del self._in_use[res]
            if res in self._parked:
                self._open.add(res)

    def copied(self, work: Work[P, T]) -> None:
        """Its copy ended: the slot and its resources are free, the key stays held until
        :meth:`done`."""
        if work.stage == Stage.RUNNING:
            work.stage = Stage.FINISHING
            self._stop_running(work)

    def done(self, work: Work[P, T]) -> None:
        """Its outcome is acknowledged (or it had none): its offset may be committed and the
        next work of its key may start."""
        self._end(work)
        if not work.dropped:
            self._parts[work.partition].incomplete.discard(work.offset)

    def retry(self, work: Work[P, T]) -> None:
        """It failed in a way that must be tried again: back to waiting at the head of its key
        (no later work of the disk passes it); its offset keeps holding the commits. A work of
        a revoked partition just ends."""
        if work.dropped or self._parts[work.partition].revoked:
            self._end(work)
            return
        if work.stage == Stage.RUNNING:
            self._stop_running(work)
        work.stage = Stage.WAITING
        self._parts[work.partition].waiting += 1
        heapq.heappush(self._ready, (work.seq, work.key))

    def abandon(self, work: Work[P, T]) -> None:
        """It was cancelled (revoked or stopping): it leaves its key; its offset, if its
        partition is still held, stays unfinished."""
        self._end(work)

    def _end(self, work: Work[P, T]) -> None:
        if work.stage == Stage.RUNNING:
            self._stop_running(work)
            work.stage = Stage.FINISHING  # its slot and resources are counted free once
        queue = self._keys.get(work.key)
        if not queue or queue[0] is not work:
            return
        queue.popleft()
        if not queue:
            del self._keys[work.key]
        else:
            nxt = queue[0]
            if nxt.stage == Stage.WAITING:
                heapq.heappush(self._ready, (nxt.seq, work.key))

    # -- partitions -----------------------------------------------------------------------------
    def revoke(self, partition: P) -> list[Work[P, T]]:
        """Stop a revoked partition: forget its waiting works, add and start nothing of it any
        more. Returns its works that are running or finishing (they keep the head of their keys
        and their offsets until they end)."""
        part = self._parts.get(partition)
        if part is None:
            return []
        part.revoked = True
        part.waiting = 0
        active: list[Work[P, T]] = []
        for key in list(self._keys):
            queue = self._keys[key]
            kept: deque[Work[P, T]] = deque()
            for work in queue:
                if work.partition != partition or work.dropped:
                    kept.append(work)
                elif work.stage != Stage.WAITING:
                    active.append(work)
                    kept.append(work)
            if not kept:
                del self._keys[key]
                continue
            self._keys[key] = kept
            if kept[0] is not queue[0] and kept[0].stage == Stage.WAITING:
                heapq.heappush(self._ready, (kept[0].seq, key))
        return active

    def forget(self, partition: P) -> int | None:
        """Remove a revoked partition (after its works ended); returns the offset that may
        still be committed for it, if it advanced. A work of it still unwinding no longer
        counts for anything but its key."""
        part = self._parts.pop(partition, None)
        if part is None:
            return None
        for queue in self._keys.values():
            for work in queue:
                if work.partition == partition:
                    work.dropped = True
        return part.commit_point()

    def partitions(self) -> list[P]:
        """The partitions it holds records of."""
        return list(self._parts)

    def due_commits(self) -> dict[P, int]:
        """The offsets to commit now, per partition (see the module docstring)."""
        due: dict[P, int] = {}
        for partition, part in self._parts.items():
            point = part.commit_point()
            if point is None or part.revoked:
                continue
            base = part.committed if part.committed is not None else part.first
            assert base is not None
            if part.waiting == 0 or point - base >= self.commit_every:
                due[partition] = point
        return due

    def committed(self, offsets: dict[P, int]) -> None:
        """These commits were acknowledged by the group coordinator."""
        for partition, offset in offsets.items():
            part = self._parts.get(partition)
            if part is not None and (part.committed is None or offset > part.committed):
                part.committed = offset

    def flow(self) -> tuple[list[P], list[P]]:
        """The partitions to pause and to resume now (each change reported once)."""
        pause, resume = [], []
        for partition, part in self._parts.items():
            if part.revoked:
                continue
            if not part.paused and part.waiting >= self.max_waiting:
                part.paused = True
                pause.append(partition)
            elif part.paused and part.waiting <= self.max_waiting // 2:
                part.paused = False
                resume.append(partition)
        return pause, resume

    # -- views ----------------------------------------------------------------------------------
    def waiting(self) -> list[Work[P, T]]:
        """Every waiting work of the held partitions, in arrival order: the start order but
        for works a resource limit holds back (:meth:`waits_for`), which others pass."""
        found = [w for queue in self._keys.values() for w in queue
                 if w.stage == Stage.WAITING and not w.dropped]
        return sorted(found, key=lambda w: w.seq)

    def waits_for(self, work: Work[P, T]) -> WaitsFor:
        """What a waiting ``work`` waits for: an earlier work of its key, then a resource at
        its limit (it would not start with a free slot either), else a slot."""
        queue = self._keys.get(work.key)
        if not queue or queue[0] is not work:
            return WaitsFor("key")
        full = self._full(work)
        if full is not None:
            return WaitsFor(full[0], full[1], self.limits[full[0]])
        return WaitsFor("slot", limit=self.capacity)

    def in_use(self) -> dict[Resource, int]:
        """Running works per limited resource (resources none holds are left out)."""
        return dict(self._in_use)

    def active(self) -> Iterator[Work[P, T]]:
        """The works running or finishing."""
        for queue in self._keys.values():
            if queue[0].stage != Stage.WAITING:
                yield queue[0]
