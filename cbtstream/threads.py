"""Opening something in a worker thread without leaking it when the awaiting task is cancelled.

``await asyncio.to_thread(open_it)`` has a hole: a task cancelled while the thread runs gets its
``CancelledError`` at once, but the thread cannot be stopped; it finishes the open and hands the
result to nobody. For a replica file that result is a descriptor holding an exclusive
open-file-description lock, so the copier's own process kept the replica locked for as long as
it lived, and every later sync of that disk, on any copier, failed with ``replica_in_use`` (a
rebalance cancels running copies, and one landed in the middle of the open: found by the site
test with a copier killed every cycle).

:func:`opened_in_thread` runs the opener the same way (the caller's context variables, the
default executor) and, if the task is cancelled before the result is taken, closes the result
as soon as the thread delivers it, then lets the cancellation go on.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger(__name__)

R = TypeVar("R")


async def opened_in_thread(opener: Callable[..., R], /, *args: Any,
                           close: Callable[[R], object]) -> R:
    """``opener(*args)`` in a thread; what it returns after the caller was cancelled is passed
    to ``close`` (its errors are raised to the caller as usual, or dropped after a cancel)."""
    loop = asyncio.get_running_loop()
    ctx = contextvars.copy_context()
    fut = loop.run_in_executor(None, functools.partial(ctx.run, opener, *args))
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        fut.add_done_callback(functools.partial(_close_orphan, close))
        raise


def _close_orphan(close: Callable[[Any], object], fut: asyncio.Future[Any]) -> None:
    """Close what a cancelled caller's opener returned (nothing if it failed)."""
    if fut.cancelled() or fut.exception() is not None:
        return
    try:
        close(fut.result())
    except Exception as exc:  # a leak is logged, never raised into the event loop
        log.warning("could not close what a cancelled open returned",
                    extra={"error": f"{type(exc).__name__}: {exc}"})
