"""The retention planner and the plan of a drop (pure), and a drop interrupted at each step."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydantic import ValidationError

from cbtstream.config import PointsPolicy
from consumers.points import catalogue as cat_mod
from consumers.points.catalogue import Point
from consumers.points.prune import Merge, collect_garbage, merge_stores, plan_drops
from consumers.points.retention import decide
from tests.unit.points.sim import Sim

NOW = datetime(2024, 3, 1, 12, tzinfo=UTC)


def _points(times: list[datetime]) -> list[Point]:
    return [Point(id=i + 1, sync_id=f"s{i}", change_id=f"c{i}", committed_at=t,
                  root_digest=f"r{i}", store=f"st{i}" if i < len(times) - 1 else None)
            for i, t in enumerate(times)]


def test_count_keeps_the_newest() -> None:
    pts = _points([NOW - timedelta(hours=10 - i) for i in range(10)])
    d = decide(pts, PointsPolicy(count=4), NOW)
    assert sorted(d.keep) == [7, 8, 9, 10] and sorted(d.drop) == list(range(1, 7))
    assert d.keep[10] == "live"


def test_count_one_keeps_only_the_live_point() -> None:
    pts = _points([NOW - timedelta(hours=3 - i) for i in range(3)])
    assert sorted(decide(pts, PointsPolicy(), NOW).keep) == [3]
    assert not PointsPolicy().keeps_history
    assert PointsPolicy(weekly=1).keeps_history


def test_daily_and_weekly_keepers() -> None:
    # four points a day for 20 days, the last on NOW's day
    times = [NOW - timedelta(days=19 - d, hours=h) for d in range(20) for h in (9, 6, 3, 0)]
    pts = _points(times)
    d = decide(pts, PointsPolicy(count=2, daily=3, weekly=2), NOW)
    kept = {pts[i - 1].committed_at for i in d.keep}
    assert {t for t in kept if t is not None} == {
        NOW, NOW - timedelta(hours=3),                       # count (NOW: the live point)
        NOW - timedelta(days=1), NOW - timedelta(days=2),     # daily: newest of each day
        # weekly: newest of this ISO week (NOW), and of the week before (Sunday 25 Feb)
        datetime(2024, 2, 25, 12, tzinfo=UTC),
    }
    assert d.keep[len(pts)] == "live"


def test_days_without_a_point_do_not_count() -> None:
    times = [NOW - timedelta(days=30), NOW - timedelta(days=20), NOW]
    d = decide(_points(times), PointsPolicy(daily=3), NOW)
    assert sorted(d.keep) == [1, 2, 3]


def test_max_age_overrides_every_keeper_but_the_live_point() -> None:
    times = [NOW - timedelta(days=10), NOW - timedelta(days=5), NOW - timedelta(days=1)]
    d = decide(_points(times), PointsPolicy(count=5, daily=5, max_age=timedelta(days=7)),
               NOW)
    assert d.drop == {1: "older than max_age"} and sorted(d.keep) == [2, 3]
    d = decide(_points(times), PointsPolicy(count=5, max_age=timedelta(hours=1)), NOW)
    assert sorted(d.keep) == [3]  # the live point, however old


def test_pending_points_are_neither_counted_nor_dropped() -> None:
    pts = [*_points([NOW - timedelta(hours=2), NOW - timedelta(hours=1)]),
           Point(id=3, sync_id="s", change_id="c")]
    d = decide(pts, PointsPolicy(count=1), NOW)
    assert d.keep == {2: "live"} and d.drop == {1: "not kept by count, daily or weekly"}
    assert decide([], PointsPolicy(), NOW).keep == {}


def test_policy_validation() -> None:
    assert PointsPolicy.model_validate({"max_age": "P30D"}).max_age == timedelta(days=30)
    with pytest.raises(ValidationError):
        PointsPolicy(count=0)
    with pytest.raises(ValidationError):
        PointsPolicy.model_validate({"count": 2, "other": 1})


def test_plan_drops() -> None:
    pts = _points([NOW - timedelta(hours=8 - i) for i in range(8)])  # stores st0..st6
    plan = plan_drops(pts, frozenset({1, 2, 4, 6, 7}))
    # 1, 2 lead the chain: deleted; 4 merges into 3; 6 and 7 into 5
    assert plan.merges == (Merge(3, ("st2", "st3")), Merge(5, ("st4", "st5", "st6")))
    assert set(plan.delete) == {"st0", "st1", "st2", "st3", "st4", "st5", "st6"}
    assert plan_drops(pts, frozenset()).merges == ()
    with pytest.raises(ValueError, match="live"):
        plan_drops(pts, frozenset({8}))
    with pytest.raises(ValueError, match="no complete"):
        plan_drops(pts, frozenset({99}))
    with pytest.raises(ValueError, match="sync writes"):
        plan_drops([*pts, Point(id=9, sync_id="s", change_id="c")], frozenset({1}))


def test_a_drop_interrupted_before_its_catalogue_write(tmp_path: Path) -> None:
    """The merged store is written, the catalogue is not: the old chain still reads, and the
    merged store is garbage."""
    sim = Sim(tmp_path, 1 << 20, 21)
    for _ in range(5):
        sim.run_cycle()
    cat = sim.chain.load()
    p2, p3 = cat.point(2), cat.point(3)
    assert p2.store and p3.store
    new, _ = merge_stores(tmp_path, sim.chain.name, cat.capacity, [p2.store, p3.store], p2)
    sim.check_all()
    assert collect_garbage(tmp_path, sim.chain.name, cat) == [new]
    sim.check_all()


def test_a_drop_interrupted_before_the_old_stores_went(tmp_path: Path) -> None:
    sim = Sim(tmp_path, 1 << 20, 22)
    for _ in range(5):
        sim.run_cycle()
    cat = sim.chain.load()
    p2, p3 = cat.point(2), cat.point(3)
    assert p2.store and p3.store
    new, size = merge_stores(tmp_path, sim.chain.name, cat.capacity, [p2.store, p3.store], p2)
    after = cat_mod.remove(cat, frozenset({3}), {2: (new, size)})
    cat_mod.save(tmp_path, sim.chain.name, after)  # then the crash
    del sim.models[3]
    sim.check_all()
    assert sorted(collect_garbage(tmp_path, sim.chain.name, after)) == sorted(
        [p2.store, p3.store])
    sim.check_all()
