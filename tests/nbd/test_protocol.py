"""Pure encode/decode of NBD messages."""

from __future__ import annotations

import struct

import pytest

from consumers.nbd import protocol as p
from consumers.nbd.errors import NbdProtocolError


def test_greeting_requires_fixed_newstyle() -> None:
    good = struct.pack(">QQH", p.NBDMAGIC, p.IHAVEOPT, p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES)
    assert p.parse_greeting(good) == 3
    with pytest.raises(NbdProtocolError, match="fixed newstyle"):
        p.parse_greeting(struct.pack(">QQH", p.NBDMAGIC, p.IHAVEOPT, 0))
    with pytest.raises(NbdProtocolError, match="magic"):
        p.parse_greeting(struct.pack(">QQH", 1, p.IHAVEOPT, 1))
    with pytest.raises(NbdProtocolError, match="oldstyle"):
        p.parse_greeting(struct.pack(">QQH", p.NBDMAGIC, 0x00420281861253, 1))


def test_client_flags_echo_no_zeroes() -> None:
    assert p.encode_client_flags(p.FLAG_FIXED_NEWSTYLE) == b"\0\0\0\1"
    assert p.encode_client_flags(3) == b"\0\0\0\3"


def test_go_option_layout() -> None:
    data = p.encode_go("disk", (p.INFO_BLOCK_SIZE,))
    magic, opt, length = struct.unpack_from(">QII", data)
    assert (magic, opt, length) == (p.IHAVEOPT, p.OPT_GO, 4 + 4 + 2 + 2)
    assert data[16:] == b"\0\0\0\4disk\0\1\0\3"


def test_set_meta_context_layout() -> None:
    data = p.encode_set_meta_context("", ("base:allocation",))
    assert data[16:] == b"\0\0\0\0" + b"\0\0\0\1" + b"\0\0\0\x0f" + b"base:allocation"


def test_request_layout() -> None:
    req = p.encode_request(p.CMD_FLAG_FUA, p.CMD_WRITE, 7, 4096, 512)
    assert struct.unpack(">IHHQQI", req) == (p.REQUEST_MAGIC, 1, 1, 7, 4096, 512)


def test_option_reply_checks() -> None:
    raw = struct.pack(">QIII", p.OPT_REPLY_MAGIC, p.OPT_GO, p.REP_ERR_UNKNOWN, 5)
    reply = p.parse_option_reply_header(raw, p.OPT_GO)
    assert reply.is_error and reply.length == 5
    assert p.option_error_text(reply, b"nope!") == "unknown export: nope!"
    with pytest.raises(NbdProtocolError):
        p.parse_option_reply_header(raw, p.OPT_STRUCTURED_REPLY)
    with pytest.raises(NbdProtocolError, match="too large"):
        p.parse_option_reply_header(
            struct.pack(">QIII", p.OPT_REPLY_MAGIC, p.OPT_GO, p.REP_INFO, 1 << 30), p.OPT_GO
        )


def test_info_parsing() -> None:
    assert p.parse_info(struct.pack(">HQH", p.INFO_EXPORT, 1 << 40, 0x1ED)) == (0, (1 << 40, 0x1ED))
    assert p.parse_info(struct.pack(">HIII", p.INFO_BLOCK_SIZE, 1, 4096, 1 << 25))[1] == (
        1,
        4096,
        1 << 25,
    )
    with pytest.raises(NbdProtocolError):
        p.parse_info(struct.pack(">HQ", p.INFO_EXPORT, 1))


def test_reply_headers() -> None:
    simple = p.parse_simple_reply(struct.pack(">IIQ", p.SIMPLE_REPLY_MAGIC, 5, 9))
    assert (simple.structured, simple.error, simple.handle, simple.done) == (False, 5, 9, True)
    chunk = p.parse_chunk_header(
        struct.pack(">IHHQI", p.STRUCTURED_REPLY_MAGIC, 0, p.REPLY_TYPE_OFFSET_DATA, 3, 100)
    )
    assert chunk.structured and not chunk.done and chunk.length == 100
    with pytest.raises(NbdProtocolError):
        p.parse_chunk_header(struct.pack(">IHHQI", p.SIMPLE_REPLY_MAGIC, 0, 0, 0, 0))


def test_error_chunks() -> None:
    payload = struct.pack(">IH", 5, 3) + b"bad"
    assert p.parse_error_chunk(p.REPLY_TYPE_ERROR, payload) == (5, "bad", None)
    with_offset = payload + struct.pack(">Q", 4096)
    assert p.parse_error_chunk(p.REPLY_TYPE_ERROR_OFFSET, with_offset) == (5, "bad", 4096)
    with pytest.raises(NbdProtocolError):
        p.parse_error_chunk(p.REPLY_TYPE_ERROR, struct.pack(">IH", 5, 10) + b"short")
    with pytest.raises(NbdProtocolError):
        p.parse_error_chunk(p.REPLY_TYPE_ERROR, struct.pack(">IH", 0, 0))


def test_block_status_and_holes() -> None:
    payload = struct.pack(">III", 1, 4096, 0) + struct.pack(">II", 8192, 3)
    assert p.parse_block_status(payload) == (1, [(4096, 0), (8192, 3)])
    with pytest.raises(NbdProtocolError):
        p.parse_block_status(struct.pack(">I", 1))
    with pytest.raises(NbdProtocolError):
        p.parse_block_status(struct.pack(">III", 1, 0, 0))
    assert p.parse_hole_chunk(struct.pack(">QI", 10, 20)) == (10, 20)
    with pytest.raises(NbdProtocolError):
        p.parse_hole_chunk(struct.pack(">QI", 10, 0))
