"""Read buffers shared by every copy of a process: reused, and bounded in bytes.

Each copy worker used to allocate its own buffer, as large as its largest request, for the life
of the copy. A copy of a large disk reuses it for thousands of requests; a copy of a small disk
uses it once or twice, so the copier paid a fresh allocation (page faults and zeroing, kernel
time) for about every byte of every small disk it copied. ``bench copy`` case (i), 64 disks of
16 MiB at once in one process, allocated 1.1 GiB to copy 1 GiB and spent 1.2 s of system CPU.

:class:`BufferPool` hands out buffers by size class (powers of two from 64 KiB) and takes them
back after a request completed, so later requests, of this copy or another, reuse them. The
bytes handed out are bounded (``copier.buffer_bytes``): a request that would pass the bound waits
until buffers come back (always granted when nothing is out, so one request larger than the
bound still runs), in arrival order. A buffer whose request failed or was cancelled is *lost*,
never reused: a thread or the NBD client may still be writing into it or reading from it.

One pool per event loop (:func:`pool_for`): its waiters are futures of that loop.
"""

from __future__ import annotations

import asyncio
import weakref
from collections import deque

#: The smallest size class (one digest piece: an incremental's usual request).
MIN_CLASS = 64 * 1024


def size_class(size: int) -> int:
    """The power of two >= ``size`` (at least :data:`MIN_CLASS`)."""
    return max(MIN_CLASS, 1 << max(0, size - 1).bit_length())


class BufferPool:
    """Buffers out at most ``budget`` bytes (see the module docstring); idle buffers kept for
    reuse are bounded by the same figure."""

    def __init__(self, budget: int) -> None:
        if budget < 1:
            raise ValueError("the buffer budget must be positive")
        self.budget = budget
        self.out = 0
        self.idle = 0
        self._free: dict[int, list[bytearray]] = {}
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()
        #: Buffers allocated, and handed out again from the idle ones (for the tests and a
        #: benchmark's figures).
        self.allocated = 0
        self.reused = 0

    def _fits(self, cls: int) -> bool:
        return self.out == 0 or self.out + cls <= self.budget

    async def take(self, size: int) -> memoryview:
        """A buffer of at least ``size`` bytes (its size class), waiting while the bound is
        reached. Give it back with :meth:`give` or :meth:`lose`."""
        cls = size_class(size)
        if self._waiters or not self._fits(cls):
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            entry = (cls, fut)
            self._waiters.append(entry)
            try:
                await fut
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled():
                    self.out -= cls  # granted as the cancel came: hand the grant on
                    self._wake()
                else:
                    self._waiters.remove(entry)
                    self._wake()  # it may have been holding back smaller requests
                raise
        else:
            self.out += cls
        free = self._free.get(cls)
        if free:
            self.idle -= cls
            self.reused += 1
            return memoryview(free.pop())
        self.allocated += 1
        return memoryview(bytearray(cls))

    def give(self, buf: memoryview) -> None:
        """``buf``'s request completed: it may serve the next one."""
        cls = len(buf.obj)  # type: ignore[arg-type]
        self.out -= cls
        if self.idle + cls <= self.budget:
            self._free.setdefault(cls, []).append(buf.obj)  # type: ignore[arg-type]
            self.idle += cls
        self._wake()

    def lose(self, buf: memoryview) -> None:
        """``buf``'s request failed or was cancelled: its bytes no longer count, and it is never
        handed out again (an I/O may still be using it)."""
        self.out -= len(buf.obj)  # type: ignore[arg-type]
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            cls, fut = self._waiters[0]
            if fut.done():  # cancelled while waiting
                self._waiters.popleft()
                continue
            if not self._fits(cls):
                return
            self._waiters.popleft()
            self.out += cls
            fut.set_result(None)


_POOLS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, BufferPool] = (
    weakref.WeakKeyDictionary())


def pool_for(budget: int) -> BufferPool:
    """The running loop's pool (created with ``budget`` at its first use; a later budget
    changes the bound)."""
    loop = asyncio.get_running_loop()
    pool = _POOLS.get(loop)
    if pool is None:
        pool = _POOLS[loop] = BufferPool(budget)
    pool.budget = budget
    return pool
