"""A small read-only NBD server: named exports, each a size and a blocking ``read(offset,
length)``, served over TCP or a unix socket (what ``cbtstream points serve`` hands out).

Why a server of our own and not an nbdkit python plugin: the point's reader
(``consumers/points/reader.py``) needs the project and its compiled dependencies (blake3 checks
every undo extent as it is read; the catalogue is pydantic), and nbdkit's embedded Python is the
system interpreter, not the copier's virtualenv: loading one interpreter build's extension
modules into another is not something to rely on on a copier host. Serving from the command's
own process also keeps the replica's lock, the proof and every read in one process: the lock is
released exactly when reads end, with no child to outlive it.

Read-only by construction: there is no write path. The export flags say
``NBD_FLAG_READ_ONLY``; a ``WRITE``, ``WRITE_ZEROES`` or ``TRIM`` a client sends anyway is
answered ``EPERM`` (its payload read and dropped), nothing else changes.

Protocol (``doc/proto.md`` of the NetworkBlockDevice/nbd project), the subset clients need:
fixed newstyle handshake; ``NBD_OPT_EXPORT_NAME``, ``NBD_OPT_GO`` and ``NBD_OPT_INFO`` (with
``NBD_INFO_EXPORT`` and, when asked, ``NBD_INFO_BLOCK_SIZE``), ``NBD_OPT_LIST`` and
``NBD_OPT_ABORT``; every other option (TLS, structured replies, meta contexts) is answered
``NBD_REP_ERR_UNSUP``, so clients use simple replies. Transmission: ``READ`` (at most
:data:`MAX_REQUEST` bytes inside the export), ``FLUSH`` (nothing to flush), ``DISC``. Requests of
one connection are answered in order; connections are served concurrently
(``NBD_FLAG_CAN_MULTI_CONN``: the bytes never change while served).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from consumers.nbd import protocol as p

log = logging.getLogger("cbtstream.points.serve")

#: Largest read (and largest write payload read and dropped) accepted: the protocol's usual
#: maximum block size, advertised in ``NBD_INFO_BLOCK_SIZE``.
MAX_REQUEST = 32 * 1024 * 1024
#: A client must finish the handshake within this many seconds (a silent peer is dropped).
HANDSHAKE_TIMEOUT_S = 30.0
#: Options one connection may send before it is dropped (clients need three or four).
MAX_OPTIONS = 64
#: Option payloads larger than this are not ours to parse (names are at most 4 KiB).
MAX_OPTION_DATA = 16 * 1024
#: ``NBD_OPT_INFO`` and ``NBD_OPT_LIST``, and the ``NBD_REP_SERVER`` reply (not used by the
#: client, so not in ``consumers/nbd/protocol.py``).
OPT_LIST = 3
OPT_INFO = 6
REP_SERVER = 2
CMD_TRIM = 4
#: Transmission flags of every export: read-only, flush accepted, safe with several connections.
EXPORT_FLAGS = (p.TFLAG_HAS_FLAGS | p.TFLAG_READ_ONLY | p.TFLAG_SEND_FLUSH
                | p.TFLAG_CAN_MULTI_CONN)

_OPT = struct.Struct(">QII")
_OPT_REPLY = struct.Struct(">QIII")
_REQ = struct.Struct(">IHHQQI")
_SIMPLE = struct.Struct(">IIQ")


@dataclass(frozen=True)
class Export:
    """One export: ``size`` bytes, ``read(offset, length)`` called from a worker thread."""

    size: int
    read: Callable[[int, int], bytes]


class _Drop(Exception):
    """End this connection (the client broke the protocol or asked to leave)."""


def _option_reply(option: int, reply_type: int, data: bytes = b"") -> bytes:
    return _OPT_REPLY.pack(p.OPT_REPLY_MAGIC, option, reply_type, len(data)) + data


def _info_export(export: Export) -> bytes:
    return struct.pack(">HQH", p.INFO_EXPORT, export.size, EXPORT_FLAGS)


def _info_block_size() -> bytes:
    return struct.pack(">HIII", p.INFO_BLOCK_SIZE, 1, 4096, MAX_REQUEST)


def parse_go(data: bytes) -> tuple[str, list[int]]:
    """The export name and the ``NBD_INFO_*`` requests of an ``NBD_OPT_GO``/``INFO`` payload."""
    if len(data) < 6:
        raise ValueError("too short")
    (n,) = struct.unpack_from(">I", data)
    if 4 + n + 2 > len(data):
        raise ValueError("name longer than the option")
    name = data[4 : 4 + n].decode()
    (count,) = struct.unpack_from(">H", data, 4 + n)
    rest = data[4 + n + 2 :]
    if len(rest) != 2 * count:
        raise ValueError("information requests do not match their count")
    return name, [v for (v,) in struct.iter_unpack(">H", rest)]


class ReadOnlyNbdServer:
    """Serves ``exports`` (name -> :class:`Export`) read-only until :meth:`stop`. The export
    named ``""`` (the default a client gets without a name) may be one of the others."""

    def __init__(self, exports: Mapping[str, Export]) -> None:
        self.exports = dict(exports)
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()

    async def start_tcp(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0: any free port); the port listened on."""
        self._server = await asyncio.start_server(self._serve, host, port)
        return int(self._server.sockets[0].getsockname()[1])

    async def start_unix(self, path: Path) -> None:
        """Listen on the unix socket ``path`` (which must not exist), mode 0600 before it
        listens: no other user can connect, not even for a moment."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(path))
            os.chmod(path, 0o600)
            self._server = await asyncio.start_unix_server(self._serve, sock=sock)
        except BaseException:
            sock.close()
            raise

    async def stop(self) -> None:
        """Stop listening and end every connection (safe to call twice)."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._conns):
            task.cancel()
        if self._conns:
            await asyncio.gather(*self._conns, return_exceptions=True)

    async def __aenter__(self) -> ReadOnlyNbdServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- one connection ----------------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        peer = writer.get_extra_info("peername") or "unix socket"
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
                chosen = await self._handshake(reader, writer)
            if chosen is not None:
                log.info("NBD client connected", extra={"peer": str(peer), "export": chosen[0]})
                await self._transmit(reader, writer, chosen[1])
        except (_Drop, TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        except asyncio.CancelledError:
            pass  # the server stops
        finally:
            self._conns.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _handshake(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                         ) -> tuple[str, Export] | None:
        """Options until the client picks an export (None: it aborted)."""
        writer.write(struct.pack(">QQH", p.NBDMAGIC, p.IHAVEOPT,
                                 p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES))
        (client_flags,) = struct.unpack(">I", await reader.readexactly(4))
        if client_flags & ~(p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES):
            raise _Drop
        no_zeroes = bool(client_flags & p.FLAG_C_NO_ZEROES)
        for _ in range(MAX_OPTIONS):
            magic, option, length = _OPT.unpack(await reader.readexactly(_OPT.size))
            if magic != p.IHAVEOPT or length > MAX_OPTION_DATA:
                raise _Drop
            data = await reader.readexactly(length) if length else b""
            if option == p.OPT_EXPORT_NAME:
                export = self.exports.get(data.decode(errors="replace"))
                if export is None:
                    raise _Drop  # the protocol's only answer to an unknown name here
                writer.write(struct.pack(">QH", export.size, EXPORT_FLAGS))
                if not no_zeroes:
                    writer.write(bytes(124))
                return data.decode(), export
            if option == p.OPT_ABORT:
                writer.write(_option_reply(option, p.REP_ACK))
                await writer.drain()
                return None
            if option == OPT_LIST:
                if data:
                    writer.write(_option_reply(option, p.REP_ERR_INVALID))
                    continue
                for name in self.exports:
                    raw = name.encode()
                    writer.write(_option_reply(option, REP_SERVER,
                                               struct.pack(">I", len(raw)) + raw))
                writer.write(_option_reply(option, p.REP_ACK))
                continue
            if option in (p.OPT_GO, OPT_INFO):
                try:
                    name, wanted = parse_go(data)
                except (ValueError, UnicodeDecodeError):
                    writer.write(_option_reply(option, p.REP_ERR_INVALID))
                    continue
                export = self.exports.get(name)
                if export is None:
                    writer.write(_option_reply(option, p.REP_ERR_UNKNOWN,
                                               b"no such export (read-only restore points)"))
                    continue
                writer.write(_option_reply(option, p.REP_INFO, _info_export(export)))
                if p.INFO_BLOCK_SIZE in wanted:
                    writer.write(_option_reply(option, p.REP_INFO, _info_block_size()))
                writer.write(_option_reply(option, p.REP_ACK))
                if option == p.OPT_GO:
                    return name, export
                continue
            # STARTTLS, STRUCTURED_REPLY, meta contexts, anything newer: not offered
            writer.write(_option_reply(option, p.REP_ERR_UNSUP))
            await writer.drain()
        raise _Drop

    async def _transmit(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        export: Export) -> None:
        while True:
            magic, _flags, command, handle, offset, length = _REQ.unpack(
                await reader.readexactly(_REQ.size))
            if magic != p.REQUEST_MAGIC:
                raise _Drop
            if command == p.CMD_DISC:
                return
            if command == p.CMD_WRITE:
                if length > MAX_REQUEST:
                    raise _Drop  # its payload cannot be skipped sensibly
                await reader.readexactly(length)  # dropped, never written
                writer.write(_SIMPLE.pack(p.SIMPLE_REPLY_MAGIC, errno.EPERM, handle))
            elif command in (p.CMD_WRITE_ZEROES, CMD_TRIM):
                writer.write(_SIMPLE.pack(p.SIMPLE_REPLY_MAGIC, errno.EPERM, handle))
            elif command == p.CMD_FLUSH:
                writer.write(_SIMPLE.pack(p.SIMPLE_REPLY_MAGIC, 0, handle))
            elif command == p.CMD_READ:
                if length > MAX_REQUEST or offset + length > export.size:
                    writer.write(_SIMPLE.pack(p.SIMPLE_REPLY_MAGIC, errno.EINVAL, handle))
                else:
                    await self._read(writer, export, handle, offset, length)
            else:
                writer.write(_SIMPLE.pack(p.SIMPLE_REPLY_MAGIC, errno.EINVAL, handle))
            await writer.drain()

    @staticmethod
    async def _read(writer: asyncio.StreamWriter, export: Export, handle: int, offset: int,
                    length: int) -> None:
        try:
            data = await asyncio.to_thread(export.read, offset, length) if length else b""
        except Exception as exc:  # a damaged undo extent, the replica unreadable: EIO
            log.warning("read of the served point failed", extra={
                "offset": offset, "length": length, "error": f"{type(exc).__name__}: {exc}"})
            writer.write(_SIMPLE.pack(p.SIMPLE_REPLY_MAGIC, errno.EIO, handle))
            return
        if len(data) != length:
            writer.write(_SIMPLE.pack(p.SIMPLE_REPLY_MAGIC, errno.EIO, handle))
            return
        writer.write(_SIMPLE.pack(p.SIMPLE_REPLY_MAGIC, 0, handle))
        writer.write(data)
