"""One sequential pass over a whole replica with hashing overlapping the reads: what ``verify``
(``tree_of``) and the version 1 -> 2 tree conversion (``convert.both_trees``) both do.

Two buffers alternate: while one chunk is hashed in a worker thread (hashing releases the GIL),
the next is read into the other, so a pass costs about max(read, hash) per chunk, and memory is
two chunks whatever the disk's size.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from consumers.copy.digest import PIECE

#: Bytes read per request (a multiple of the piece, so every chunk hashes whole pieces).
CHUNK = 8 * PIECE

R = TypeVar("R")
ReadInto = Callable[[int, memoryview], Awaitable[None]]


async def scan(read_into: ReadInto, capacity: int, hash_chunk: Callable[[memoryview], R],
               put: Callable[[int, R], None], *, progress: Callable[[int], None] | None = None,
               name: str = "cbt-scan") -> None:
    """Read ``capacity`` bytes in chunks with ``read_into``; ``put(offset, hash_chunk(view))``
    for each chunk, in order. ``progress`` gets each chunk's length once it is read."""
    loop = asyncio.get_running_loop()
    bufs = [memoryview(bytearray(CHUNK)), memoryview(bytearray(CHUNK))]
    with ThreadPoolExecutor(2, name) as pool:
        pending: tuple[int, asyncio.Future[R]] | None = None
        for n, offset in enumerate(range(0, capacity, CHUNK)):
            view = bufs[n % 2][: min(CHUNK, capacity - offset)]
            await read_into(offset, view)
            if pending is not None:
                put(pending[0], await pending[1])
            pending = offset, loop.run_in_executor(pool, hash_chunk, view)
            if progress is not None:
                progress(len(view))
        if pending is not None:
            put(pending[0], await pending[1])
