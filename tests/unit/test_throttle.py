"""The bandwidth throttle on a fake clock: average rate held, no sleep when unlimited."""

from __future__ import annotations

from consumers.copy.throttle import Throttle


class FakeTime:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.now += s


async def test_average_rate_is_held() -> None:
    t = FakeTime()
    th = Throttle(10 * 1024 * 1024, clock=t.clock, sleep=t.sleep)
    for _ in range(20):
        await th.acquire(1024 * 1024)
    # 20 MiB at 10 MiB/s: the last read starts 1.9 s after the first
    assert abs((t.now - 100.0) - 1.9) < 1e-9


async def test_idle_time_is_not_banked_beyond_now() -> None:
    t = FakeTime()
    th = Throttle(1000, clock=t.clock, sleep=t.sleep)
    await th.acquire(1000)
    t.now += 10  # idle
    await th.acquire(1000)
    assert t.slept == []  # first slot after an idle period starts immediately
    await th.acquire(1000)
    assert t.slept == [1.0]


async def test_unlimited_never_sleeps() -> None:
    t = FakeTime()
    th = Throttle(0, clock=t.clock, sleep=t.sleep)
    for _ in range(5):
        await th.acquire(1 << 30)
    assert t.slept == []
