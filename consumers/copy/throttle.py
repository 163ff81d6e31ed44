"""Bandwidth limit for one disk copy, so replication can share a link or a datastore politely.

Each read reserves the next free slot of ``n / rate`` seconds on a virtual timeline and sleeps
until its slot starts: the average rate never exceeds ``rate``, with no lock and no busy loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


class Throttle:
    """At most ``rate`` bytes per second on average; ``rate <= 0`` means unlimited."""

    def __init__(self, rate: int, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[object]] = asyncio.sleep) -> None:
        self.rate = rate
        self._clock = clock
        self._sleep = sleep
        self._free_at = 0.0

    async def acquire(self, n: int) -> None:
        if self.rate <= 0 or n <= 0:
            return
        now = self._clock()
        start = max(now, self._free_at)
        self._free_at = start + n / self.rate
        if start > now:
            await self._sleep(start - now)
