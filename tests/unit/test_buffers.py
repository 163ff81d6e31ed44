"""The copy buffers every copy of a process shares (consumers.copy.buffers): size classes,
reuse, the bound on bytes out, arrival order, cancels, and buffers lost to a failed request."""

from __future__ import annotations

import asyncio

import pytest

from consumers.copy.buffers import MIN_CLASS, BufferPool, pool_for, size_class

MiB = 1 << 20


def test_size_classes_are_powers_of_two_from_one_piece() -> None:
    assert [size_class(n) for n in (1, MIN_CLASS, MIN_CLASS + 1, 3 * MiB, 4 * MiB)] == [
        MIN_CLASS, MIN_CLASS, 2 * MIN_CLASS, 4 * MiB, 4 * MiB]


async def test_a_buffer_given_back_is_handed_out_again_and_a_lost_one_never() -> None:
    pool = BufferPool(16 * MiB)
    a = await pool.take(2 * MiB)
    assert len(a) == 2 * MiB and pool.out == 2 * MiB
    a[:4] = b"abcd"
    pool.give(a)
    b = await pool.take(1536 * 1024)  # same class: the same memory
    assert b.obj is a.obj and pool.reused == 1 and pool.allocated == 1
    pool.lose(b)  # its request failed: an I/O may still write into it
    c = await pool.take(2 * MiB)
    assert c.obj is not a.obj and pool.allocated == 2
    pool.give(c)
    assert pool.out == 0


async def test_takes_past_the_bound_wait_in_arrival_order() -> None:
    pool = BufferPool(4 * MiB)
    first = await pool.take(2 * MiB)
    second = await pool.take(2 * MiB)
    order: list[str] = []

    async def waiter(name: str, size: int) -> None:
        buf = await pool.take(size)
        order.append(name)
        pool.give(buf)

    big = asyncio.create_task(waiter("big", 4 * MiB))
    small = asyncio.create_task(waiter("small", MIN_CLASS))
    await asyncio.sleep(0.01)
    assert order == [] and pool.out == 4 * MiB  # nobody passes the bound, nor the queue
    pool.give(first)
    await asyncio.sleep(0.01)
    assert order == []  # 2 MiB out: the 4 MiB request waits, and the small one behind it
    pool.give(second)
    await asyncio.gather(big, small)
    assert order == ["big", "small"] and pool.out == 0


async def test_one_request_larger_than_the_bound_runs_alone() -> None:
    pool = BufferPool(MiB)
    buf = await asyncio.wait_for(pool.take(8 * MiB), 1)
    assert len(buf) == 8 * MiB
    behind = asyncio.create_task(pool.take(MIN_CLASS))
    await asyncio.sleep(0.01)
    assert not behind.done()
    pool.give(buf)  # over the bound: not kept idle
    got = await asyncio.wait_for(behind, 1)
    assert pool.idle == 0
    pool.give(got)


async def test_a_cancelled_waiter_takes_nothing_and_holds_back_nobody() -> None:
    pool = BufferPool(2 * MiB)
    held = await pool.take(2 * MiB)
    blocked = asyncio.create_task(pool.take(2 * MiB))
    after = asyncio.create_task(pool.take(MIN_CLASS))
    await asyncio.sleep(0.01)
    blocked.cancel()
    with pytest.raises(asyncio.CancelledError):
        await blocked
    pool.give(held)
    got = await asyncio.wait_for(after, 1)
    assert pool.out == MIN_CLASS
    pool.give(got)
    # granted and cancelled in the same turn: the grant goes on to the next waiter
    held = await pool.take(2 * MiB)
    granted = asyncio.create_task(pool.take(2 * MiB))
    nxt = asyncio.create_task(pool.take(2 * MiB))
    await asyncio.sleep(0.01)
    pool.give(held)  # grants `granted`...
    granted.cancel()  # ...which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await granted
    got = await asyncio.wait_for(nxt, 1)
    assert pool.out == 2 * MiB
    pool.give(got)
    assert pool.out == 0


async def test_one_pool_per_event_loop() -> None:
    assert pool_for(MiB) is pool_for(2 * MiB)
    assert pool_for(MiB).budget == MiB
