"""NBD wire format: constants and pure encode/decode functions (no I/O).

Follows ``doc/proto.md`` of the NetworkBlockDevice/nbd project: fixed newstyle handshake,
``NBD_OPT_GO`` with ``NBD_INFO_*`` replies, structured replies, ``base:allocation`` block status.
Only the values this client sends or reads are defined here; the spec has the rest.
All integers are big-endian. Decoders raise :class:`NbdProtocolError` on anything malformed, so a
misbehaving server can never make the client index out of bounds or loop.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from consumers.nbd.errors import NbdProtocolError

# Handshake magics.
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPT_REPLY_MAGIC = 0x0003E889045565A9

# Handshake flags (server) and client flags.
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

# Options.
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_STARTTLS = 5
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_SET_META_CONTEXT = 10

# Option replies.
REP_ACK = 1
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_BIT = 1 << 31
REP_ERR_UNSUP = REP_ERR_BIT | 1
REP_ERR_POLICY = REP_ERR_BIT | 2
REP_ERR_INVALID = REP_ERR_BIT | 3
REP_ERR_PLATFORM = REP_ERR_BIT | 4
REP_ERR_TLS_REQD = REP_ERR_BIT | 5
REP_ERR_UNKNOWN = REP_ERR_BIT | 6
REP_ERR_SHUTDOWN = REP_ERR_BIT | 7
REP_ERR_BLOCK_SIZE_REQD = REP_ERR_BIT | 8
REP_ERR_TOO_BIG = REP_ERR_BIT | 9

REP_ERR_NAMES = {
    REP_ERR_UNSUP: "unsupported",
    REP_ERR_POLICY: "denied by policy",
    REP_ERR_INVALID: "invalid",
    REP_ERR_PLATFORM: "unsupported on platform",
    REP_ERR_TLS_REQD: "TLS required",
    REP_ERR_UNKNOWN: "unknown export",
    REP_ERR_SHUTDOWN: "server shutting down",
    REP_ERR_BLOCK_SIZE_REQD: "block size negotiation required",
    REP_ERR_TOO_BIG: "too big",
}

# NBD_REP_INFO types.
INFO_EXPORT = 0
INFO_BLOCK_SIZE = 3

# Transmission flags.
TFLAG_HAS_FLAGS = 1 << 0
TFLAG_READ_ONLY = 1 << 1
TFLAG_SEND_FLUSH = 1 << 2
TFLAG_SEND_FUA = 1 << 3
TFLAG_SEND_WRITE_ZEROES = 1 << 6
TFLAG_CAN_MULTI_CONN = 1 << 8

# Commands and command flags.
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
CMD_NAMES = {
    CMD_READ: "READ",
    CMD_WRITE: "WRITE",
    CMD_DISC: "DISC",
    CMD_FLUSH: "FLUSH",
    CMD_WRITE_ZEROES: "WRITE_ZEROES",
    CMD_BLOCK_STATUS: "BLOCK_STATUS",
}
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1

# Transmission magics and structured reply chunk types.
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERR_BIT = 1 << 15
REPLY_TYPE_ERROR = REPLY_TYPE_ERR_BIT | 1
REPLY_TYPE_ERROR_OFFSET = REPLY_TYPE_ERR_BIT | 2

# base:allocation flags.
STATE_ZERO = 1 << 1
BASE_ALLOCATION = "base:allocation"

#: Strings (export names, messages) are limited to 4096 bytes by the protocol.
MAX_STRING = 4096
#: Largest option reply payload we accept; real ones are tiny (an info block, a context name).
MAX_OPTION_REPLY = 64 * 1024

GREETING_SIZE = 18  # NBDMAGIC, IHAVEOPT, u16 handshake flags
OPT_REPLY_HEADER_SIZE = 20
SIMPLE_REPLY_SIZE = 16
STRUCTURED_HEADER_SIZE = 20  # 16 bytes shared with the simple reply, then u32 length

_REQ = struct.Struct(">IHHQQI")
_OPT = struct.Struct(">QII")
_OPT_REPLY = struct.Struct(">QIII")
_SIMPLE = struct.Struct(">IIQ")
_CHUNK = struct.Struct(">IHHQI")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_GREETING = struct.Struct(">QQH")


def parse_greeting(data: bytes) -> int:
    """Check the server's greeting and return its handshake flags."""
    magic, opt_magic, flags = _GREETING.unpack(data)
    if magic != NBDMAGIC:
        raise NbdProtocolError(f"not an NBD server (bad magic {magic:#x})")
    if opt_magic != IHAVEOPT:
        raise NbdProtocolError("server uses oldstyle negotiation, which is not supported")
    if not flags & FLAG_FIXED_NEWSTYLE:
        raise NbdProtocolError("server does not support fixed newstyle negotiation")
    return int(flags)


def encode_client_flags(server_flags: int) -> bytes:
    flags = FLAG_C_FIXED_NEWSTYLE
    if server_flags & FLAG_NO_ZEROES:
        flags |= FLAG_C_NO_ZEROES
    return _U32.pack(flags)


def encode_option(option: int, data: bytes = b"") -> bytes:
    return _OPT.pack(IHAVEOPT, option, len(data)) + data


def _string(value: str) -> bytes:
    raw = value.encode()
    if len(raw) > MAX_STRING:
        raise ValueError(f"string longer than {MAX_STRING} bytes")
    return raw


def encode_go(export_name: str, info_requests: tuple[int, ...] = (INFO_BLOCK_SIZE,)) -> bytes:
    """Data of ``NBD_OPT_GO``: the export name and the ``NBD_INFO_*`` items we want."""
    name = _string(export_name)
    body = _U32.pack(len(name)) + name + _U16.pack(len(info_requests))
    body += b"".join(_U16.pack(i) for i in info_requests)
    return encode_option(OPT_GO, body)


def encode_set_meta_context(export_name: str, queries: tuple[str, ...]) -> bytes:
    name = _string(export_name)
    body = _U32.pack(len(name)) + name + _U32.pack(len(queries))
    for q in queries:
        raw = _string(q)
        body += _U32.pack(len(raw)) + raw
    return encode_option(OPT_SET_META_CONTEXT, body)


@dataclass(frozen=True, slots=True)
class OptionReply:
    """Header of one option reply; the payload follows on the wire."""

    option: int
    reply_type: int
    length: int

    @property
    def is_error(self) -> bool:
        return bool(self.reply_type & REP_ERR_BIT)


def parse_option_reply_header(data: bytes, expected_option: int) -> OptionReply:
    magic, option, reply_type, length = _OPT_REPLY.unpack(data)
    if magic != OPT_REPLY_MAGIC:
        raise NbdProtocolError(f"bad option reply magic {magic:#x}")
    if option != expected_option:
        raise NbdProtocolError(f"reply to option {option}, expected {expected_option}")
    if length > MAX_OPTION_REPLY:
        raise NbdProtocolError(f"option reply of {length} bytes is too large")
    return OptionReply(option, reply_type, length)


def option_error_text(reply: OptionReply, payload: bytes) -> str:
    name = REP_ERR_NAMES.get(reply.reply_type, f"error {reply.reply_type & ~REP_ERR_BIT}")
    message = payload.decode(errors="replace")[:MAX_STRING]
    return f"{name}: {message}" if message else name


def parse_info(payload: bytes) -> tuple[int, tuple[int, ...]]:
    """Decode an ``NBD_REP_INFO`` payload into (info type, values)."""
    if len(payload) < 2:
        raise NbdProtocolError("NBD_REP_INFO payload too short")
    (kind,) = _U16.unpack_from(payload)
    if kind == INFO_EXPORT:
        if len(payload) != 12:
            raise NbdProtocolError("NBD_INFO_EXPORT must be 12 bytes")
        size, flags = struct.unpack_from(">QH", payload, 2)
        return kind, (size, flags)
    if kind == INFO_BLOCK_SIZE:
        if len(payload) != 14:
            raise NbdProtocolError("NBD_INFO_BLOCK_SIZE must be 14 bytes")
        return kind, struct.unpack_from(">III", payload, 2)
    return kind, ()


def parse_meta_context(payload: bytes) -> tuple[int, str]:
    if len(payload) < 4:
        raise NbdProtocolError("NBD_REP_META_CONTEXT payload too short")
    (context_id,) = _U32.unpack_from(payload)
    return context_id, payload[4:].decode(errors="replace")


def encode_request(flags: int, command: int, handle: int, offset: int, length: int) -> bytes:
    return _REQ.pack(REQUEST_MAGIC, flags, command, handle, offset, length)


@dataclass(frozen=True, slots=True)
class ReplyHeader:
    """A simple reply (``structured`` False, ``error`` set) or a structured chunk header."""

    structured: bool
    handle: int
    error: int = 0
    flags: int = 0
    chunk_type: int = 0
    length: int = 0

    @property
    def done(self) -> bool:
        return not self.structured or bool(self.flags & REPLY_FLAG_DONE)


def reply_magic(data: bytes | memoryview) -> int:
    return int(_U32.unpack_from(data)[0])


def parse_simple_reply(data: bytes | memoryview) -> ReplyHeader:
    magic, error, handle = _SIMPLE.unpack_from(data)
    if magic != SIMPLE_REPLY_MAGIC:
        raise NbdProtocolError(f"bad reply magic {magic:#x}")
    return ReplyHeader(structured=False, handle=handle, error=error)


def parse_chunk_header(data: bytes | memoryview) -> ReplyHeader:
    magic, flags, chunk_type, handle, length = _CHUNK.unpack_from(data)
    if magic != STRUCTURED_REPLY_MAGIC:
        raise NbdProtocolError(f"bad structured reply magic {magic:#x}")
    return ReplyHeader(True, handle, flags=flags, chunk_type=chunk_type, length=length)


def parse_error_chunk(chunk_type: int, payload: bytes) -> tuple[int, str, int | None]:
    """Decode an error chunk into (errno, message, offset or None)."""
    if len(payload) < 6:
        raise NbdProtocolError("error chunk shorter than 6 bytes")
    error, msg_len = struct.unpack_from(">IH", payload)
    if 6 + msg_len > len(payload):
        raise NbdProtocolError("error chunk message longer than the chunk")
    message = payload[6 : 6 + msg_len].decode(errors="replace")
    offset: int | None = None
    if chunk_type == REPLY_TYPE_ERROR_OFFSET:
        if len(payload) != 6 + msg_len + 8:
            raise NbdProtocolError("NBD_REPLY_TYPE_ERROR_OFFSET has a bad length")
        (offset,) = _U64.unpack_from(payload, 6 + msg_len)
    if error == 0:
        raise NbdProtocolError("error chunk with error 0")
    return error, message, offset


def parse_hole_chunk(payload: bytes) -> tuple[int, int]:
    if len(payload) != 12:
        raise NbdProtocolError("NBD_REPLY_TYPE_OFFSET_HOLE must be 12 bytes")
    offset, size = struct.unpack(">QI", payload)
    if size == 0:
        raise NbdProtocolError("hole chunk of size 0")
    return int(offset), int(size)


def parse_block_status(payload: bytes) -> tuple[int, list[tuple[int, int]]]:
    """Decode a ``NBD_REPLY_TYPE_BLOCK_STATUS`` payload into (context id, [(length, flags)])."""
    if len(payload) < 12 or (len(payload) - 4) % 8:
        raise NbdProtocolError(f"block status chunk of {len(payload)} bytes")
    (context_id,) = _U32.unpack_from(payload)
    descriptors = [
        (int(length), int(flags)) for length, flags in struct.iter_unpack(">II", payload[4:])
    ]
    if any(length == 0 for length, _ in descriptors):
        raise NbdProtocolError("block status descriptor of length 0")
    return context_id, descriptors


U64 = _U64
