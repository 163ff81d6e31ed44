"""The receiving end of one NBD connection: an asyncio buffered protocol that takes bytes into a
scratch buffer, or straight into the buffer of the read request being received, so read payloads
are copied once, from the kernel into their final place.

It knows nothing of NBD messages: it tells its :class:`WireListener` (the client) that data
arrived, that a direct receive finished, or that the connection was lost; the client parses.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Protocol

from consumers.nbd.errors import NbdConnectionError, NbdError, NbdServerError

#: Bytes of the scratch buffer for headers and small payloads.
SCRATCH = 256 * 1024


class WireListener(Protocol):
    """What the wire reports to the client that owns it."""

    def on_data(self) -> None:
        """New bytes are in the scratch buffer."""

    def on_direct_done(self) -> None:
        """The direct receive into a request's buffer completed."""

    def on_lost(self, exc: NbdError) -> None:
        """The connection is gone: every request in flight fails with ``exc``."""


@dataclass(eq=False, slots=True)
class Request:
    handle: int
    command: int
    offset: int
    length: int
    future: asyncio.Future[None]
    dest: memoryview | None = None
    covered: list[tuple[int, int]] = field(default_factory=list)
    error: NbdServerError | None = None
    status: list[tuple[int, int]] | None = None


class Wire(asyncio.BufferedProtocol):
    """Receives bytes into a scratch buffer, or directly into a read request's buffer."""

    def __init__(self, listener: WireListener) -> None:
        self._listener = listener
        self._scratch = bytearray(SCRATCH)
        self._view = memoryview(self._scratch)
        self._start = 0
        self._end = 0
        self._direct: memoryview | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._want = 0
        #: False during the handshake (bytes are consumed by ``read_exact``), True afterwards.
        self.transmission = False
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.lost_exc: Exception | None = None
        self._writable = asyncio.Event()
        self._writable.set()

    # -- asyncio callbacks -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost_exc = NbdConnectionError(
            f"connection to the NBD server lost: {exc}"
            if exc
            else "NBD server closed the connection"
        )
        if not self.closed.done():
            self.closed.set_result(None)
        self._writable.set()
        self._listener.on_lost(self.lost_exc)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(self.lost_exc)

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._direct is not None and self._start == self._end:
            return self._direct
        if self._start == self._end:
            self._start = self._end = 0
        elif self._end > SCRATCH - 4096:
            n = self._end - self._start
            self._scratch[:n] = self._scratch[self._start : self._end]
            self._start, self._end = 0, n
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        try:
            if self._direct is not None and self._start == self._end:
                self._direct = self._direct[nbytes:]
                if not len(self._direct):
                    self._direct = None
                    self._listener.on_direct_done()
                else:
                    return
            else:
                self._end += nbytes
            self._pump()
        except NbdError as exc:
            self.abort(exc)

    # -- byte access used by the client's state machine --------------------------------------
    @property
    def available(self) -> int:
        return self._end - self._start

    def take(self, n: int) -> bytes:
        data = bytes(self._view[self._start : self._start + n])
        self._start += n
        return data

    def peek(self, n: int) -> memoryview:
        return self._view[self._start : self._start + n]

    def skip(self, n: int) -> None:
        self._start += n

    def receive_into(self, dest: memoryview) -> None:
        """Fill ``dest``: first from the scratch buffer, then straight from the socket."""
        n = min(self.available, len(dest))
        if n:
            dest[:n] = self._view[self._start : self._start + n]
            self._start += n
        if n < len(dest):
            self._direct = dest[n:]
        else:
            self._listener.on_direct_done()

    def _pump(self) -> None:
        if self._waiter is not None:
            if self.available >= self._want and not self._waiter.done():
                self._waiter.set_result(None)
            return
        if self.transmission:
            self._listener.on_data()

    async def read_exact(self, n: int) -> bytes:
        """Handshake-phase read of exactly ``n`` bytes."""
        if self.available < n:
            if self.lost_exc is not None:
                raise self.lost_exc
            self._want = n
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self.take(n)

    async def drain(self) -> None:
        await self._writable.wait()
        if self.lost_exc is not None:
            raise self.lost_exc

    def abort(self, exc: NbdError) -> None:
        """Hard disconnect after a protocol violation."""
        self._listener.on_lost(exc)
        if self.transport is not None:
            self.transport.abort()
