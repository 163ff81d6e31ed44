"""A stalled NBD server: the request fails within the request timeout with a retriable
connection error (never a hung copy), and the connection is not reused."""

from __future__ import annotations

import asyncio
import struct

import pytest

from consumers.nbd import protocol as p
from consumers.nbd.client import NbdClient
from consumers.nbd.errors import NbdConnectionError
from consumers.nbd.uri import parse_nbd_uri

SIZE = 1 << 20


_WRITERS: list[asyncio.StreamWriter] = []


async def _stalling_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Fixed newstyle handshake with NBD_OPT_EXPORT_NAME, then never answers a request."""
    _WRITERS.append(writer)
    writer.write(struct.pack(">QQH", p.NBDMAGIC, p.IHAVEOPT, p.FLAG_FIXED_NEWSTYLE))
    await writer.drain()
    await reader.readexactly(4)  # client flags
    while True:
        magic, option, length = struct.unpack(">QII", await reader.readexactly(16))
        data = await reader.readexactly(length)
        assert magic == p.IHAVEOPT and data is not None
        if option == p.OPT_EXPORT_NAME:
            writer.write(struct.pack(">QH", SIZE, p.TFLAG_HAS_FLAGS) + bytes(124))
            await writer.drain()
            break
        # refuse every other option (GO, structured replies...): the client falls back
        writer.write(struct.pack(">QIII", p.OPT_REPLY_MAGIC, option, p.REP_ERR_UNSUP, 0))
        await writer.drain()
    await reader.read()  # swallow requests forever


async def test_stalled_server_times_out_instead_of_hanging() -> None:
    server = await asyncio.start_server(_stalling_server, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        client = NbdClient(parse_nbd_uri(f"nbd://127.0.0.1:{port}/"), request_timeout=0.5)
        await client.start()
        try:
            buf = memoryview(bytearray(4096))
            with pytest.raises(NbdConnectionError, match="no reply") as info:
                await asyncio.wait_for(client.read_into(0, buf), 10)
            assert info.value.retriable
            with pytest.raises(NbdConnectionError):
                await client.read_into(0, buf)  # the connection is not reused
        finally:
            await client.stop()
    finally:
        for w in _WRITERS:
            w.close()
        server.close()
        await server.wait_closed()
