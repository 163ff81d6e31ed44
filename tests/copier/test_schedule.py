"""The copier's schedule (``consumers/schedule.py``): order per key, capacity, commits below the
lowest unfinished offset, pause/resume bounds, revocation. Pure: no Kafka, no event loop."""

from __future__ import annotations

import random

import pytest

from consumers.schedule import Schedule, Stage, Work

Sched = Schedule[str, str]


def _drain(s: Sched) -> list[Work[str, str]]:
    started = []
    while (w := s.next()) is not None:
        started.append(w)
    return started


def _finish(s: Sched, w: Work[str, str]) -> None:
    s.copied(w)
    s.done(w)


def test_different_keys_of_one_partition_run_concurrently_up_to_capacity() -> None:
    s: Sched = Schedule(capacity=3, max_waiting=100, commit_every=100)
    for off, key in enumerate("abcde"):
        s.add("p0", off, key, f"plan-{key}")
    started = _drain(s)
    assert [w.key for w in started] == ["a", "b", "c"]  # oldest first, capacity 3
    assert s.running == 3
    s.copied(started[1])  # b's copy ended: its slot goes to the next disk at once
    assert [w.key for w in _drain(s)] == ["d"]
    assert s.next() is None


def test_a_key_runs_one_work_at_a_time_in_offset_order() -> None:
    s: Sched = Schedule(capacity=4, max_waiting=100, commit_every=100)
    a1 = s.add("p0", 0, "a", "a1")
    s.add("p0", 1, "b", "b1")
    a2 = s.add("p0", 2, "a", "a2")
    assert a1 is not None and a2 is not None
    assert [w.item for w in _drain(s)] == ["a1", "b1"]  # a2 waits behind a1
    s.copied(a1)
    assert s.next() is None, "a disk's next plan started before the previous outcome was out"
    s.done(a1)
    assert [w.item for w in _drain(s)] == ["a2"]


def test_a_key_never_has_two_works_running_whatever_the_order_of_events() -> None:
    rng = random.Random(7)
    s: Sched = Schedule(capacity=3, max_waiting=1000, commit_every=10)
    keys = "abcdef"
    offsets = {"p0": 0, "p1": 0}
    order: dict[str, list[int]] = {k: [] for k in keys}
    expected: dict[str, list[int]] = {k: [] for k in keys}
    active: list[Work[str, str]] = []
    for _ in range(2000):
        roll = rng.random()
        if roll < 0.4:
            part = rng.choice(["p0", "p1"])
            key = rng.choice(keys[:3] if part == "p0" else keys[3:])
            w = s.add(part, offsets[part], key, "x")
            assert w is not None
            expected[key].append(w.seq)
            offsets[part] += 1
        elif active and roll < 0.8:
            w = active.pop(rng.randrange(len(active)))
            if w.stage == Stage.RUNNING:
                s.copied(w)
                active.append(w)
            elif rng.random() < 0.1:
                s.retry(w)
            else:
                s.done(w)
        for w in _drain(s):
            assert sum(1 for a in active if a.key == w.key) == 0
            if w.seq not in order[w.key]:
                order[w.key].append(w.seq)
            active.append(w)
        assert s.running <= 3
    for key in keys:  # each key started its works in arrival order, never overtaking
        assert order[key] == expected[key][: len(order[key])]


def test_commit_point_stays_below_the_lowest_unfinished_offset() -> None:
    s: Sched = Schedule(capacity=4, max_waiting=100, commit_every=1)
    big = s.add("p0", 10, "big", "seed")
    small = [s.add("p0", 11 + i, f"s{i}", "small") for i in range(3)]
    _drain(s)
    for w in small:
        assert w is not None
        _finish(s, w)
    assert s.due_commits() == {}  # 11..13 are done, but 10 is not: nothing may be committed
    assert big is not None
    _finish(s, big)
    assert s.due_commits() == {"p0": 14}
    s.committed({"p0": 14})
    assert s.due_commits() == {}


def test_records_with_nothing_to_do_are_committed_up_to_the_first_unfinished() -> None:
    s: Sched = Schedule(capacity=1, max_waiting=100, commit_every=1)
    s.passed("p0", 5)
    w = s.add("p0", 6, "a", "plan")
    s.passed("p0", 7)
    assert s.due_commits() == {"p0": 6}
    assert w is not None
    _drain(s)
    _finish(s, w)
    assert s.due_commits() == {"p0": 8}


def test_commits_are_batched_while_work_waits() -> None:
    s: Sched = Schedule(capacity=1, max_waiting=1000, commit_every=3)
    works = [s.add("p0", off, f"d{off}", "plan") for off in range(10)]
    for w in works[:2]:
        assert w is not None and s.next() is w
        _finish(s, w)
    assert s.due_commits() == {}  # advanced by 2 < 3 with work still waiting
    w = works[2]
    assert w is not None and s.next() is w
    _finish(s, w)
    assert s.due_commits() == {"p0": 3}
    s.committed({"p0": 3})
    for w in works[3:]:
        assert w is not None and s.next() is w
        _finish(s, w)
    assert s.due_commits() == {"p0": 10}  # nothing waits any more: commit what is done


def test_duplicate_offsets_are_dropped() -> None:
    s: Sched = Schedule(capacity=1, max_waiting=100, commit_every=1)
    assert s.add("p0", 3, "a", "x") is not None
    assert s.add("p0", 3, "a", "x") is None
    assert s.add("p0", 2, "b", "x") is None


def test_partition_pauses_at_the_bound_and_resumes_at_half() -> None:
    s: Sched = Schedule(capacity=1, max_waiting=4, commit_every=100)
    for off in range(3):
        s.add("p0", off, f"d{off}", "plan")
    assert s.flow() == ([], [])
    s.add("p0", 3, "d3", "plan")
    assert s.flow() == (["p0"], [])
    assert s.flow() == ([], [])  # reported once
    first = s.next()  # 3 waiting: still above half
    assert first is not None
    assert s.flow() == ([], [])
    _finish(s, first)
    second = s.next()  # 2 waiting: resume
    assert second is not None
    assert s.flow() == ([], ["p0"])


def test_a_retried_work_keeps_its_place_at_the_head_of_its_key() -> None:
    s: Sched = Schedule(capacity=2, max_waiting=100, commit_every=1)
    a1 = s.add("p0", 0, "a", "a1")
    a2 = s.add("p0", 1, "a", "a2")
    assert a1 is not None and a2 is not None
    assert _drain(s) == [a1]
    s.copied(a1)
    s.retry(a1)  # publishing its outcome failed
    assert s.due_commits() == {}
    assert _drain(s) == [a1], "a later plan of the disk passed a failed one"
    _finish(s, a1)
    assert s.due_commits() == {"p0": 1}
    assert _drain(s) == [a2]


def test_revoke_forgets_waiting_works_and_returns_the_active_ones() -> None:
    s: Sched = Schedule(capacity=2, max_waiting=2, commit_every=1)
    a = s.add("p0", 0, "a", "a")
    b = s.add("p0", 1, "b", "b")
    s.add("p0", 2, "c", "c")
    s.add("p0", 3, "a", "a-later")
    d = s.add("p1", 0, "d", "d")
    assert _drain(s) == [a, b]
    assert a is not None and b is not None and d is not None
    assert s.flow() == (["p0"], [])
    active = s.revoke("p0")
    assert set(active) == {a, b}
    assert s.waiting() == [d]
    assert s.add("p0", 4, "e", "e") is None  # nothing of a revoked partition is taken
    assert s.next() is None  # the cancelled copies still hold their slots until they unwind
    s.abandon(a)
    assert s.next() is d
    s.copied(b)  # b's outcome is published after the revoke: it counts for the last commit
    s.done(b)
    assert s.due_commits() == {} and s.flow() == ([], [])  # nothing is due for a revoked one
    assert s.forget("p0") is None  # a (offset 0) never finished: nothing to commit
    assert s.partitions() == ["p1"]


def test_forget_returns_the_commit_point_of_what_finished() -> None:
    s: Sched = Schedule(capacity=2, max_waiting=100, commit_every=100)
    a = s.add("p0", 7, "a", "a")
    s.add("p0", 8, "b", "b")
    assert a is not None and s.next() is a
    _finish(s, a)
    s.revoke("p0")
    assert s.forget("p0") == 8
    assert s.forget("p0") is None


def test_a_work_failing_after_its_partition_was_revoked_is_not_started_again() -> None:
    s: Sched = Schedule(capacity=1, max_waiting=100, commit_every=1)
    a = s.add("p0", 0, "a", "a")
    assert a is not None and s.next() is a
    s.copied(a)
    s.revoke("p0")
    s.retry(a)  # its outcome could not be published
    assert s.next() is None and s.waiting() == []
    assert s.forget("p0") is None


def test_a_dropped_work_still_blocks_its_key_until_it_ends() -> None:
    s: Sched = Schedule(capacity=2, max_waiting=100, commit_every=1)
    a0 = s.add("p0", 0, "a", "on p0")
    a1 = s.add("p1", 0, "a", "on p1")  # the same disk on another partition
    assert _drain(s) == [a0]
    s.revoke("p0")
    s.forget("p0")  # gave up waiting for it: it still unwinds
    assert s.next() is None
    assert a0 is not None
    s.abandon(a0)
    assert s.next() is a1
    assert s.add("p0", 0, "x", "p0 assigned again") is not None  # a fresh start


def test_waiting_lists_works_in_start_order() -> None:
    s: Sched = Schedule(capacity=1, max_waiting=100, commit_every=1)
    for off, key in enumerate("abca"):
        s.add("p0" if off % 2 else "p1", off, key, f"{key}{off}")
    first = s.next()
    assert first is not None and first.item == "a0"
    assert [w.item for w in s.waiting()] == ["b1", "c2", "a3"]
    assert [w.item for w in s.active()] == ["a0"]


def test_invalid_limits_are_refused() -> None:
    with pytest.raises(ValueError):
        Schedule(capacity=0, max_waiting=1, commit_every=1)
