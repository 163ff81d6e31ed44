"""An asyncio NBD client built for throughput: replies are received straight into the caller's
buffers.

One :class:`NbdClient` is one connection. Requests are pipelined: any number may be in flight and
replies are matched by handle, in whatever order the server sends them. Read payloads (simple
replies and ``NBD_REPLY_TYPE_OFFSET_DATA`` chunks) are received with ``recv_into`` directly into
the ``memoryview`` the caller passed to :meth:`NbdClient.read_into`, so the data is copied once,
from the kernel into its final buffer. Small messages (headers, block status, errors) go through
a scratch buffer.

The module is the transmission phase (requests and reply parsing); the bytes arrive through
:mod:`consumers.nbd.wire` and the negotiation is :mod:`consumers.nbd.handshake`.

Lifecycle: ``start()`` connects and negotiates (fixed newstyle, optional STARTTLS, structured
replies, ``base:allocation``, ``NBD_OPT_GO``); ``stop()`` waits for requests in flight, sends
``NBD_CMD_DISC`` and closes (safe to call twice); ``async with`` does both.

Errors: a server error reply raises :class:`NbdServerError` for that request only; a protocol
violation or a lost connection fails every request in flight and closes the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from types import TracebackType

from consumers.nbd import protocol as p
from consumers.nbd.errors import (
    NbdConnectionError,
    NbdError,
    NbdNegotiationError,
    NbdProtocolError,
    NbdServerError,
    NbdUnsupported,
)
from consumers.nbd.handshake import negotiate
from consumers.nbd.uri import NbdAddress
from consumers.nbd.wire import SCRATCH, Request, Wire

#: Largest non-data payload accepted (block status with many descriptors, error messages).
_MAX_META_PAYLOAD = 16 * 1024 * 1024
_ZEROS = bytes(1024 * 1024)


class NbdClient:
    """One NBD connection to one export. See the module docstring."""

    def __init__(
        self,
        address: NbdAddress,
        *,
        tls_context: ssl.SSLContext | None = None,
        connect_timeout: float = 30.0,
        request_timeout: float = 300.0,
        want_block_status: bool = True,
    ) -> None:
        self.address = address
        self._tls_context = tls_context
        self._connect_timeout = connect_timeout
        #: A request without a reply for this long fails the whole connection: a stalled
        #: server must end in an error the copier can retry, never in a hung sync.
        self._request_timeout = request_timeout
        self._want_block_status = want_block_status
        self._wire: Wire | None = None
        self._pending: dict[int, Request] = {}
        self._next_handle = 1
        self._failed: NbdError | None = None
        self._stopped = False
        # Reply parsing state.
        self._hdr: p.ReplyHeader | None = None
        self._req: Request | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        # Negotiated facts.
        self.size = 0
        self.flags = 0
        self.structured = False
        self.meta_context_id: int | None = None
        self.min_block = 1
        self.preferred_block = 4096
        self.max_block = 32 * 1024 * 1024

    # -- properties ------------------------------------------------------------------------
    @property
    def read_only(self) -> bool:
        return bool(self.flags & p.TFLAG_READ_ONLY)

    @property
    def can_flush(self) -> bool:
        return bool(self.flags & p.TFLAG_SEND_FLUSH)

    @property
    def can_zero(self) -> bool:
        return bool(self.flags & p.TFLAG_SEND_WRITE_ZEROES)

    @property
    def can_multi_conn(self) -> bool:
        return bool(self.flags & p.TFLAG_CAN_MULTI_CONN)

    @property
    def can_block_status(self) -> bool:
        return self.meta_context_id is not None

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    # -- lifecycle -------------------------------------------------------------------------
    async def __aenter__(self) -> NbdClient:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Connect and negotiate; afterwards :attr:`size` and the capability flags are known."""
        loop = asyncio.get_running_loop()
        addr = self.address
        try:
            async with asyncio.timeout(self._connect_timeout):
                if addr.socket_path is not None:
                    _, wire = await loop.create_unix_connection(
                        lambda: Wire(self), addr.socket_path
                    )
                else:
                    assert addr.host is not None
                    _, wire = await loop.create_connection(
                        lambda: Wire(self), addr.host, addr.port
                    )
                self._wire = wire
                n = await negotiate(wire, addr, self._tls_context, self._want_block_status)
                self.size, self.flags, self.structured = n.size, n.flags, n.structured
                self.meta_context_id = n.meta_context_id
                self.min_block, self.preferred_block, self.max_block = (
                    n.min_block, n.preferred_block, n.max_block)
                wire.transmission = True
        except TimeoutError as exc:
            await self._close()
            raise NbdConnectionError(f"NBD handshake with {addr.endpoint()} timed out") from exc
        except OSError as exc:
            await self._close()
            raise NbdConnectionError(
                f"cannot connect to NBD server {addr.endpoint()}: {exc}"
            ) from exc
        except NbdNegotiationError:
            if self._wire is not None and self._wire.transport is not None:
                # A soft disconnect, as the protocol asks of a client that gives up haggling.
                self._wire.transport.write(p.encode_option(p.OPT_ABORT))
            await self._close()
            raise
        except BaseException:
            await self._close()
            raise

    async def stop(self) -> None:
        """Wait for requests in flight, send ``NBD_CMD_DISC`` and close. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        wire = self._wire
        if wire is None or wire.transport is None or wire.lost_exc is not None:
            await self._close()
            return
        with contextlib.suppress(NbdError, TimeoutError):
            async with asyncio.timeout(30):
                await self._idle.wait()
        if wire.lost_exc is None and wire.transport is not None:
            wire.transport.write(p.encode_request(0, p.CMD_DISC, 0, 0, 0))
        await self._close()

    async def _close(self) -> None:
        wire = self._wire
        if wire is None or wire.transport is None:
            return
        if wire.transport.can_write_eof() and not wire.transport.is_closing():
            with contextlib.suppress(OSError, RuntimeError):
                wire.transport.write_eof()
        wire.transport.close()
        try:
            async with asyncio.timeout(5):
                await wire.closed
        except TimeoutError:
            wire.transport.abort()

    def _require_wire(self) -> Wire:
        if self._wire is None:
            raise NbdConnectionError("not connected")
        return self._wire

    # -- requests --------------------------------------------------------------------------
    async def _submit(
        self,
        command: int,
        offset: int,
        length: int,
        *,
        flags: int = 0,
        data: memoryview | bytes | None = None,
        dest: memoryview | None = None,
    ) -> Request:
        if self._failed is not None:
            raise self._failed
        wire = self._require_wire()
        if wire.lost_exc is not None:
            raise wire.lost_exc
        if self._stopped:
            raise NbdConnectionError("client is stopped")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"request [{offset}, +{length}) outside the export ({self.size})")
        handle = self._next_handle
        self._next_handle = (handle + 1) & 0xFFFFFFFFFFFFFFFF or 1
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        req = Request(handle, command, offset, length, fut, dest=dest)
        self._pending[handle] = req
        self._idle.clear()
        assert wire.transport is not None
        wire.transport.write(p.encode_request(flags, command, handle, offset, length))
        if data is not None:
            wire.transport.write(data)
        try:
            async with asyncio.timeout(self._request_timeout):
                await wire.drain()
                await fut
        except TimeoutError:
            # The reply may still come and write into ``dest`` later: the connection cannot be
            # trusted any more, so drop it and fail everything in flight.
            wire.abort(NbdConnectionError(
                f"no reply from {self.address} within {self._request_timeout:g}s "
                f"({p.CMD_NAMES.get(command, command)} at {offset})"))
            raise self._failed or NbdConnectionError("request timed out") from None
        if req.error is not None:
            raise req.error
        return req

    async def read_into(self, offset: int, dest: memoryview) -> None:
        """Read ``len(dest)`` bytes at ``offset`` into ``dest`` (a writable byte memoryview)."""
        if not len(dest):
            return
        self._check_max(len(dest))
        await self._submit(p.CMD_READ, offset, len(dest), dest=dest)

    async def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        await self.read_into(offset, memoryview(buf))
        return bytes(buf)

    async def write(self, offset: int, data: memoryview | bytes, *, fua: bool = False) -> None:
        """Write ``data`` at ``offset``. The buffer must stay unchanged until this returns."""
        if self.read_only:
            raise NbdUnsupported("the export is read-only")
        if not len(data):
            return
        self._check_max(len(data))
        flags = p.CMD_FLAG_FUA if fua and self.flags & p.TFLAG_SEND_FUA else 0
        await self._submit(p.CMD_WRITE, offset, len(data), flags=flags, data=data)

    async def write_zeroes(self, offset: int, length: int, *, punch: bool = True) -> None:
        """Make ``length`` bytes at ``offset`` read as zeroes (``punch`` allows a hole)."""
        if self.read_only:
            raise NbdUnsupported("the export is read-only")
        if not length:
            return
        if not self.can_zero:
            for start in range(offset, offset + length, len(_ZEROS)):
                n = min(len(_ZEROS), offset + length - start)
                await self.write(start, memoryview(_ZEROS)[:n])
            return
        flags = 0 if punch else p.CMD_FLAG_NO_HOLE
        await self._submit(p.CMD_WRITE_ZEROES, offset, length, flags=flags)

    async def flush(self) -> None:
        """Ask the server to make every completed write durable."""
        if not self.can_flush:
            return  # The server promises nothing more: writes are durable when acknowledged.
        await self._submit(p.CMD_FLUSH, 0, 0)

    async def block_status(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        """``base:allocation`` of ``[offset, offset+length)`` as ``(start, length, flags)``.

        The server may describe less than asked (never nothing); callers loop.
        """
        if self.meta_context_id is None:
            raise NbdUnsupported("the server did not agree to base:allocation")
        length = min(length, 0xFFFFFFFF & ~0xFFF, self.size - offset)
        req = await self._submit(p.CMD_BLOCK_STATUS, offset, length)
        if not req.status:
            raise NbdProtocolError("block status reply without descriptors")
        out: list[tuple[int, int, int]] = []
        pos = offset
        for n, flags in req.status:
            n = min(n, offset + length - pos)
            if n <= 0:
                break
            out.append((pos, n, flags))
            pos += n
        return out

    def _check_max(self, n: int) -> None:
        if n > self.max_block:
            raise ValueError(f"request of {n} bytes exceeds the server maximum {self.max_block}")

    # -- reply state machine (called by Wire) ---------------------------------------------
    # -- what the wire reports (consumers.nbd.wire.WireListener) ----------------------------
    def on_data(self) -> None:
        self._process()

    def on_direct_done(self) -> None:
        self._direct_done()

    def on_lost(self, exc: NbdError) -> None:
        self._fail_all(exc)

    def _fail_all(self, exc: NbdError) -> None:
        if self._failed is None:
            self._failed = exc
        for req in self._pending.values():
            if not req.future.done():
                req.future.set_exception(exc)
        self._pending.clear()
        self._idle.set()

    def _finish(self, req: Request) -> None:
        self._pending.pop(req.handle, None)
        if not req.future.done():
            req.future.set_result(None)
        if not self._pending:
            self._idle.set()

    def _server_error(self, req: Request, errno: int, message: str = "") -> None:
        if req.error is None:
            req.error = NbdServerError(
                p.CMD_NAMES.get(req.command, str(req.command)),
                req.offset,
                req.length,
                errno,
                message,
            )

    def _process(self) -> None:
        """Parse as many replies as the scratch buffer holds."""
        wire = self._require_wire()
        while wire._direct is None:
            if self._hdr is None:
                if wire.available < p.SIMPLE_REPLY_SIZE:
                    return
                magic = p.reply_magic(wire.peek(4))
                if magic == p.SIMPLE_REPLY_MAGIC:
                    hdr = p.parse_simple_reply(wire.peek(p.SIMPLE_REPLY_SIZE))
                    wire.skip(p.SIMPLE_REPLY_SIZE)
                    self._on_simple(hdr)
                    continue
                if magic != p.STRUCTURED_REPLY_MAGIC:
                    raise NbdProtocolError(f"bad reply magic {magic:#x}")
                if wire.available < p.STRUCTURED_HEADER_SIZE:
                    return
                hdr = p.parse_chunk_header(wire.peek(p.STRUCTURED_HEADER_SIZE))
                wire.skip(p.STRUCTURED_HEADER_SIZE)
                self._on_chunk_header(hdr)
                continue
            hdr = self._hdr
            req = self._req
            assert req is not None
            if hdr.chunk_type == p.REPLY_TYPE_OFFSET_DATA:
                if wire.available < 8:
                    return
                self._start_data_chunk(req, hdr, int(p.U64.unpack_from(wire.take(8))[0]))
                continue
            if wire.available < hdr.length:
                if hdr.length > SCRATCH - 4096:
                    self._big_payload(req, hdr)
                return
            self._on_chunk_payload(req, hdr, wire.take(hdr.length))

    def _lookup(self, handle: int) -> Request:
        req = self._pending.get(handle)
        if req is None:
            raise NbdProtocolError(f"reply for unknown handle {handle}")
        return req

    def _on_simple(self, hdr: p.ReplyHeader) -> None:
        req = self._lookup(hdr.handle)
        if hdr.error:
            self._server_error(req, hdr.error)
            self._finish(req)
            return
        if req.command == p.CMD_READ:
            if self.structured:
                raise NbdProtocolError("simple reply to READ after structured replies were agreed")
            assert req.dest is not None
            self._req = req
            self._hdr = hdr
            self._require_wire().receive_into(req.dest)
            return
        self._finish(req)

    def _on_chunk_header(self, hdr: p.ReplyHeader) -> None:
        if not self.structured:
            raise NbdProtocolError("structured reply chunk without negotiation")
        req = self._lookup(hdr.handle)
        t = hdr.chunk_type
        if t == p.REPLY_TYPE_NONE:
            if hdr.length or not hdr.done:
                raise NbdProtocolError("NBD_REPLY_TYPE_NONE with a payload or without DONE")
            self._complete_chunk(req, hdr)
            return
        if t == p.REPLY_TYPE_OFFSET_DATA:
            if req.command != p.CMD_READ or hdr.length < 9:
                raise NbdProtocolError("unexpected NBD_REPLY_TYPE_OFFSET_DATA chunk")
        elif t in (p.REPLY_TYPE_OFFSET_HOLE, p.REPLY_TYPE_BLOCK_STATUS) or t & p.REPLY_TYPE_ERR_BIT:
            if hdr.length > _MAX_META_PAYLOAD:
                raise NbdProtocolError(f"chunk payload of {hdr.length} bytes is too large")
        else:
            raise NbdProtocolError(f"unknown structured reply type {t}")
        self._hdr, self._req = hdr, req

    def _start_data_chunk(self, req: Request, hdr: p.ReplyHeader, offset: int) -> None:
        n = hdr.length - 8
        rel = offset - req.offset
        if rel < 0 or rel + n > req.length:
            raise NbdProtocolError("data chunk outside the requested range")
        assert req.dest is not None
        req.covered.append((rel, rel + n))
        self._hdr = p.ReplyHeader(True, hdr.handle, flags=hdr.flags, chunk_type=-1, length=n)
        self._require_wire().receive_into(req.dest[rel : rel + n])

    def _big_payload(self, req: Request, hdr: p.ReplyHeader) -> None:
        raise NbdProtocolError(f"metadata chunk of {hdr.length} bytes is not supported")

    def _direct_done(self) -> None:
        """A direct receive (simple READ payload or data chunk) completed."""
        hdr, req = self._hdr, self._req
        assert hdr is not None and req is not None
        if not hdr.structured:
            self._hdr = self._req = None
            self._finish(req)
            return
        self._complete_chunk(req, hdr)

    def _on_chunk_payload(self, req: Request, hdr: p.ReplyHeader, payload: bytes) -> None:
        t = hdr.chunk_type
        if t == p.REPLY_TYPE_OFFSET_HOLE:
            if req.command != p.CMD_READ:
                raise NbdProtocolError("hole chunk in reply to a non-read")
            offset, size = p.parse_hole_chunk(payload)
            rel = offset - req.offset
            if rel < 0 or rel + size > req.length:
                raise NbdProtocolError("hole chunk outside the requested range")
            assert req.dest is not None
            for s in range(rel, rel + size, len(_ZEROS)):
                e = min(s + len(_ZEROS), rel + size)
                req.dest[s:e] = _ZEROS[: e - s]
            req.covered.append((rel, rel + size))
        elif t == p.REPLY_TYPE_BLOCK_STATUS:
            if req.command != p.CMD_BLOCK_STATUS:
                raise NbdProtocolError("block status chunk in reply to another command")
            context_id, descriptors = p.parse_block_status(payload)
            if context_id == self.meta_context_id:
                req.status = descriptors
        else:  # error chunk (known or unknown type with the error bit)
            errno, message, _ = p.parse_error_chunk(t, payload)
            self._server_error(req, errno, message)
        self._complete_chunk(req, hdr)

    def _complete_chunk(self, req: Request, hdr: p.ReplyHeader) -> None:
        self._hdr = self._req = None
        if not hdr.done:
            return
        if req.command == p.CMD_READ and req.error is None:
            covered = sorted(req.covered)
            pos = 0
            for start, end in covered:
                if start != pos:
                    raise NbdProtocolError("read reply chunks overlap or leave a gap")
                pos = end
            if pos != req.length:
                raise NbdProtocolError("read reply ended before covering the whole request")
        self._finish(req)
