"""Where disk bytes are read from: an NBD export (production: ``nbdkit vddk``), or a local file
(tests and benchmarks).

A :class:`BlockSource` reads into caller buffers and reports which parts of a range read as
zeroes. Zero information comes only from the server's (or file system's) allocation map, never
from looking at data samples.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import ssl
from collections.abc import AsyncIterator, Sequence
from types import TracebackType
from typing import Protocol, runtime_checkable

from cbtstream.errors import CbtStreamError
from consumers.nbd import protocol as p
from consumers.nbd.client import NbdClient
from consumers.nbd.errors import NbdError
from consumers.nbd.uri import NbdAddress, check_allowed, parse_nbd_uri

log = logging.getLogger("cbtstream.copier.source")
#: How long an extra connection to a server that does not advertise multi-conn may take.
_EXTRA_CONNECT_TIMEOUT_S = 2.0


class SourceError(CbtStreamError):
    """The source could not be opened or read."""

    reason = "source_error"


@runtime_checkable
class BlockSource(Protocol):
    """Read side of a copy."""

    @property
    def size(self) -> int: ...

    #: Largest request :meth:`read_into` accepts.
    @property
    def max_request(self) -> int: ...

    async def read_into(self, offset: int, buf: memoryview) -> None: ...

    async def zero_map(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """``(start, length, is_zero)`` covering a prefix (at least one byte) of the range."""
        ...


class NbdSource:
    """An NBD export read over ``connections`` connections (requests go to the least busy).

    Several connections are only opened if the server advertises multi-conn, or the export is
    read-only (a frozen snapshot), where consistency across connections is not a concern.
    """

    def __init__(
        self,
        address: NbdAddress,
        *,
        connections: int = 2,
        tls_context: ssl.SSLContext | None = None,
        block_status: bool = True,
    ) -> None:
        self.address = address
        self._wanted = max(1, connections)
        self._tls = tls_context
        self._block_status = block_status
        self._clients: list[NbdClient] = []

    @property
    def size(self) -> int:
        return self._clients[0].size

    @property
    def max_request(self) -> int:
        return self._clients[0].max_block

    @property
    def clients(self) -> Sequence[NbdClient]:
        return self._clients

    async def start(self) -> None:
        first = NbdClient(self.address, tls_context=self._tls, want_block_status=self._block_status)
        await first.start()
        self._clients = [first]
        if self._wanted == 1 or not (first.can_multi_conn or first.read_only):
            return
        # A server that advertises multi-conn serves every connection; a read-only one that does
        # not (qemu-nbd -r serves one client unless started with -e N) may never answer the
        # second handshake: try it briefly and carry on with what was accepted.
        timeout = None if first.can_multi_conn else _EXTRA_CONNECT_TIMEOUT_S
        for _ in range(self._wanted - 1):
            c = NbdClient(self.address, tls_context=self._tls, want_block_status=False,
                          **({} if timeout is None else {"connect_timeout": timeout}))
            try:
                await c.start()
            except NbdError as exc:
                if timeout is None:
                    await self.stop()
                    raise
                log.info("NBD server accepts no further connection; using %d",
                         len(self._clients), extra={"endpoint": self.address.endpoint(),
                                                    "error": str(exc)})
                break
            except BaseException:
                await self.stop()
                raise
            self._clients.append(c)

    async def stop(self) -> None:
        clients, self._clients = self._clients, []
        for c in clients:
            with contextlib.suppress(NbdError):
                await c.stop()

    async def __aenter__(self) -> NbdSource:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def read_into(self, offset: int, buf: memoryview) -> None:
        client = min(self._clients, key=lambda c: c.in_flight)
        await client.read_into(offset, buf)

    async def zero_map(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        first = self._clients[0]
        if not first.can_block_status:
            return [(offset, length, False)]
        return [
            (start, n, bool(flags & p.STATE_ZERO))
            for start, n, flags in await first.block_status(offset, length)
        ]


@contextlib.asynccontextmanager
async def open_nbd_source(
    uri: str,
    allow: Sequence[str],
    *,
    connections: int = 2,
    tls_context: ssl.SSLContext | None = None,
) -> AsyncIterator[NbdSource]:
    """Open an NBD source after checking its endpoint against the allow-list.

    Raises :class:`cbtstream.errors.PermissionDenied` for an endpoint not in ``allow``
    (``copier.nbd_allow``), before any connection is made.
    """
    address = parse_nbd_uri(uri)
    check_allowed(address, allow)
    source = NbdSource(address, connections=connections, tls_context=tls_context)
    await source.start()
    try:
        yield source
    finally:
        await source.stop()


class FileSource:
    """A local file or block device, read with ``preadv``; holes come from SEEK_DATA/SEEK_HOLE."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._fd = -1
        self._size = 0

    @property
    def size(self) -> int:
        return self._size

    @property
    def max_request(self) -> int:
        return 1 << 30

    async def start(self) -> None:
        try:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise SourceError(f"cannot open source {self.path}: {exc.strerror}") from exc
        self._size = os.lseek(self._fd, 0, os.SEEK_END)

    async def stop(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    async def __aenter__(self) -> FileSource:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    def _read(self, offset: int, buf: memoryview) -> None:
        done = 0
        while done < len(buf):
            n = os.preadv(self._fd, [buf[done:]], offset + done)
            if n == 0:
                raise SourceError(f"unexpected end of {self.path} at {offset + done}")
            done += n

    async def read_into(self, offset: int, buf: memoryview) -> None:
        try:
            await asyncio.to_thread(self._read, offset, buf)
        except OSError as exc:
            raise SourceError(f"read of {self.path} at {offset} failed: {exc.strerror}") from exc

    async def zero_map(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        end = min(offset + length, self._size)
        try:
            data = os.lseek(self._fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # nothing but a hole from offset to the end
                return [(offset, end - offset, True)]
            return [(offset, end - offset, False)]  # no SEEK_DATA here: everything is data
        if data > offset:
            return [(offset, min(data, end) - offset, True)]
        hole = os.lseek(self._fd, offset, os.SEEK_HOLE)
        return [(offset, min(hole, end) - offset, False)]
