"""Which restore points to drop (pure): count, age, and daily/weekly keepers (GFS-like).

Rules, over the complete points of a disk (a pending point is never dropped nor counted):

1. the live point (the newest complete one) is always kept: the replica holds it;
2. the newest ``count`` points are kept;
3. for each of the latest ``daily`` UTC days that have a point, its newest point is kept;
   likewise for the latest ``weekly`` ISO weeks (UTC). Days and weeks *that have a point*, not
   calendar days back from now, so an outage does not expire the keepers before it;
4. a point committed more than ``max_age`` before ``now`` is dropped even if rule 2 or 3 keeps
   it (the age limit is the operator's promise about how far back data is kept);
5. every other point is dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from cbtstream.config import PointsPolicy
from consumers.points.catalogue import Point


@dataclass(frozen=True, slots=True)
class Decision:
    """The planner's answer: ids kept and dropped, each with why."""

    keep: dict[int, str]
    drop: dict[int, str]


def _newest_per(points: Sequence[Point], key_of: str, periods: int) -> set[int]:
    """Ids of the newest point of each of the latest ``periods`` periods that have one."""
    if periods <= 0:
        return set()
    newest: dict[tuple[int, int], int] = {}
    for p in points:  # oldest first: later points overwrite
        assert p.committed_at is not None
        at = p.committed_at.astimezone(UTC)
        if key_of == "day":
            key = (at.toordinal(), 0)
        else:
            iso = at.isocalendar()
            key = (iso.year, iso.week)
        newest[key] = p.id
    return {newest[k] for k in sorted(newest)[-periods:]}


def decide(points: Sequence[Point], policy: PointsPolicy, now: datetime) -> Decision:
    """Which of ``points`` (a catalogue's, oldest first) to keep and drop (rules above)."""
    done = [p for p in points if p.complete]
    if not done:
        return Decision({}, {})
    live = done[-1].id
    keep: dict[int, str] = {}
    for p in done[-policy.count :]:
        keep[p.id] = "count"
    for pid in _newest_per(done, "day", policy.daily):
        keep.setdefault(pid, "daily")
    for pid in _newest_per(done, "week", policy.weekly):
        keep.setdefault(pid, "weekly")
    drop: dict[int, str] = {}
    for p in done:
        assert p.committed_at is not None
        if p.id == live:
            keep[p.id] = "live"
        elif policy.max_age is not None and now - p.committed_at > policy.max_age:
            keep.pop(p.id, None)
            drop[p.id] = "older than max_age"
        elif p.id not in keep:
            drop[p.id] = "not kept by count, daily or weekly"
    return Decision(keep, drop)
