"""The asyncio NBD client against real nbdkit (and one deliberately broken server)."""

from __future__ import annotations

import asyncio
import os
import struct
from pathlib import Path

import pytest

from consumers.nbd import protocol as p
from consumers.nbd.client import NbdClient
from consumers.nbd.errors import (
    NbdConnectionError,
    NbdProtocolError,
    NbdServerError,
    NbdUnsupported,
)
from consumers.nbd.uri import parse_nbd_uri
from tests.nbd.nbdkit import nbdkit, needs_nbdkit

pytestmark = needs_nbdkit


async def test_memory_export_roundtrip(tmp_path: Path) -> None:
    with nbdkit(tmp_path, "memory", "64M") as uri:
        async with NbdClient(parse_nbd_uri(uri)) as c:
            assert c.size == 64 << 20
            assert c.structured and c.can_block_status and c.can_flush and c.can_zero
            data = os.urandom(3 << 20)
            await c.write(12345, data)
            assert await c.read(12345, len(data)) == data
            await c.write_zeroes(12345 + 4096, 1 << 20)
            back = await c.read(12345, len(data))
            assert back[:4096] == data[:4096]
            assert back[4096 : 4096 + (1 << 20)] == bytes(1 << 20)
            assert back[4096 + (1 << 20) :] == data[4096 + (1 << 20) :]
            await c.flush()
            status = await c.block_status(0, c.size)
            assert status[0][0] == 0 and sum(n for _, n, _ in status) <= c.size
            untouched = await c.block_status(32 << 20, 1 << 20)
            assert untouched[0][:2] == (32 << 20, 1 << 20) and untouched[0][2] & p.STATE_ZERO
            # The end of the export, at a length that is not a multiple of anything.
            await c.write(c.size - 7, b"tail!!!")
            assert await c.read(c.size - 10, 10) == b"\0\0\0tail!!!"
            with pytest.raises(ValueError):
                await c.read(c.size - 1, 2)


async def test_many_requests_in_flight(tmp_path: Path) -> None:
    with nbdkit(tmp_path, "memory", "32M") as uri:
        async with NbdClient(parse_nbd_uri(uri)) as c:
            blocks = [os.urandom(256 * 1024) for _ in range(32)]
            await asyncio.gather(*(c.write(i * 262144 * 4, b) for i, b in enumerate(blocks)))
            bufs = [bytearray(256 * 1024) for _ in blocks]
            await asyncio.gather(
                *(c.read_into(i * 262144 * 4, memoryview(b)) for i, b in enumerate(bufs))
            )
            assert bufs == [bytearray(b) for b in blocks]


async def test_tcp_and_read_only(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(1 << 20))
    with nbdkit(tmp_path, "-r", "file", str(image), tcp=True) as uri:
        async with NbdClient(parse_nbd_uri(uri)) as c:
            assert c.read_only
            assert await c.read(0, 1 << 20) == image.read_bytes()
            with pytest.raises(NbdUnsupported):
                await c.write(0, b"x")


async def test_sparse_file_reads_holes(tmp_path: Path) -> None:
    image = tmp_path / "sparse.img"
    with image.open("wb") as f:
        f.truncate(8 << 20)
        f.seek(4 << 20)
        f.write(b"\xab" * 65536)
    with nbdkit(tmp_path, "-r", "file", str(image)) as uri:
        async with NbdClient(parse_nbd_uri(uri)) as c:
            status = await c.block_status(0, c.size)
            zero = [(s, n) for s, n, f in status if f & p.STATE_ZERO]
            assert (0, 4 << 20) in zero
            assert await c.read(0, 8 << 20) == image.read_bytes()


async def test_server_error_is_reported_and_connection_survives(tmp_path: Path) -> None:
    with nbdkit(
        tmp_path, "--filter=error", "memory", "1M", "error-pread=EIO", "error-pread-rate=1"
    ) as uri:
        async with NbdClient(parse_nbd_uri(uri)) as c:
            with pytest.raises(NbdServerError) as info:
                await c.read(0, 4096)
            assert info.value.errno == 5 and info.value.command == "READ"
            await c.write(0, b"still usable")  # one failed request does not end the session


async def test_no_structured_replies_server(tmp_path: Path) -> None:
    with nbdkit(tmp_path, "--no-sr", "memory", "1M") as uri:
        async with NbdClient(parse_nbd_uri(uri)) as c:
            assert not c.structured and not c.can_block_status
            await c.write(100, b"simple")
            assert await c.read(100, 6) == b"simple"
            with pytest.raises(NbdUnsupported):
                await c.block_status(0, 4096)


async def test_connection_refused(tmp_path: Path) -> None:
    with pytest.raises(NbdConnectionError):
        await NbdClient(parse_nbd_uri(f"nbd+unix:///?socket={tmp_path}/none.sock")).start()


async def _broken_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(struct.pack(">QQH", p.NBDMAGIC, p.IHAVEOPT, 1))
    await reader.readexactly(4)
    while True:  # answer options: ACK structured replies, GO with an export info, then ACK
        _, opt, length = struct.unpack(">QII", await reader.readexactly(16))
        await reader.readexactly(length)
        if opt == p.OPT_GO:
            info = struct.pack(">HQH", p.INFO_EXPORT, 1 << 20, p.TFLAG_HAS_FLAGS)
            writer.write(struct.pack(">QIII", p.OPT_REPLY_MAGIC, opt, p.REP_INFO, len(info)) + info)
            writer.write(struct.pack(">QIII", p.OPT_REPLY_MAGIC, opt, p.REP_ACK, 0))
            break
        writer.write(struct.pack(">QIII", p.OPT_REPLY_MAGIC, opt, p.REP_ERR_UNSUP, 0))
    await reader.readexactly(28)
    writer.write(struct.pack(">IIQ", 0xDEADBEEF, 0, 1))  # a reply with a bad magic
    await writer.drain()
    await reader.read()
    writer.close()


async def test_protocol_violation_fails_request_and_closes(tmp_path: Path) -> None:
    sock = tmp_path / "broken.sock"
    server = await asyncio.start_unix_server(_broken_server, path=str(sock))
    async with server:
        c = NbdClient(parse_nbd_uri(f"nbd+unix:///?socket={sock}"))
        await c.start()
        assert c.size == 1 << 20 and not c.structured
        with pytest.raises(NbdProtocolError, match="magic"):
            await c.read(0, 4096)
        with pytest.raises((NbdProtocolError, NbdConnectionError)):
            await c.read(0, 4096)
        await c.stop()
        await c.stop()
