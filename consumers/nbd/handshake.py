"""The NBD handshake (fixed newstyle): greeting, optional STARTTLS, structured replies, the
``base:allocation`` meta context, and ``NBD_OPT_GO`` (or ``NBD_OPT_EXPORT_NAME`` on servers that
predate it). The outcome is what the export offers (:class:`Negotiated`); transmission is the
client's business (``client.py``)."""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass

from consumers.nbd import protocol as p
from consumers.nbd.errors import NbdNegotiationError, NbdProtocolError
from consumers.nbd.uri import NbdAddress
from consumers.nbd.wire import Wire


@dataclass
class Negotiated:
    """What the server told us about the export."""

    size: int = 0
    flags: int = 0
    structured: bool = False
    meta_context_id: int | None = None
    min_block: int = 1
    preferred_block: int = 4096
    max_block: int = 32 * 1024 * 1024


async def _option(wire: Wire, option: int, request: bytes) -> list[tuple[p.OptionReply, bytes]]:
    """Send one option and collect its replies up to the final one (ACK or error)."""
    assert wire.transport is not None
    wire.transport.write(request)
    replies: list[tuple[p.OptionReply, bytes]] = []
    while True:
        header = p.parse_option_reply_header(await wire.read_exact(p.OPT_REPLY_HEADER_SIZE),
                                             option)
        payload = await wire.read_exact(header.length) if header.length else b""
        replies.append((header, payload))
        if header.is_error or header.reply_type == p.REP_ACK:
            return replies
        if len(replies) > 1000:
            raise NbdProtocolError("too many option replies")


def _check_tls_required(header: p.OptionReply, payload: bytes) -> None:
    if header.reply_type == p.REP_ERR_TLS_REQD:
        raise NbdNegotiationError(
            "the server requires TLS; use an nbds:// URI: " + p.option_error_text(header, payload)
        )


async def negotiate(wire: Wire, address: NbdAddress, tls_context: ssl.SSLContext | None,
                    want_block_status: bool) -> Negotiated:
    """Run the handshake on a connected ``wire``; raises ``NbdNegotiationError`` if the
    server will not serve the export as asked."""
    assert wire.transport is not None
    n = Negotiated()
    server_flags = p.parse_greeting(await wire.read_exact(p.GREETING_SIZE))
    no_zeroes = bool(server_flags & p.FLAG_NO_ZEROES)
    wire.transport.write(p.encode_client_flags(server_flags))
    if address.tls or tls_context is not None:
        await _starttls(wire, address, tls_context)
    header, payload = (
        await _option(wire, p.OPT_STRUCTURED_REPLY, p.encode_option(p.OPT_STRUCTURED_REPLY))
    )[-1]
    _check_tls_required(header, payload)
    n.structured = header.reply_type == p.REP_ACK
    if n.structured and want_block_status:
        for header, payload in await _option(
            wire, p.OPT_SET_META_CONTEXT,
            p.encode_set_meta_context(address.export, (p.BASE_ALLOCATION,)),
        ):
            if header.reply_type == p.REP_META_CONTEXT:
                context_id, name = p.parse_meta_context(payload)
                if name == p.BASE_ALLOCATION:
                    n.meta_context_id = context_id
    replies = await _option(wire, p.OPT_GO, p.encode_go(address.export))
    final, final_payload = replies[-1]
    if final.reply_type == p.REP_ERR_UNSUP:
        await _export_name(wire, address, no_zeroes, n)
        return n
    _check_tls_required(final, final_payload)
    if final.is_error:
        raise NbdNegotiationError(
            f"export {address.export!r}: {p.option_error_text(final, final_payload)}"
        )
    got_export = False
    for header, payload in replies[:-1]:
        if header.reply_type != p.REP_INFO:
            continue
        kind, values = p.parse_info(payload)
        if kind == p.INFO_EXPORT:
            n.size, n.flags = values
            got_export = True
        elif kind == p.INFO_BLOCK_SIZE:
            n.min_block, n.preferred_block, n.max_block = values
    if not got_export:
        raise NbdProtocolError("NBD_OPT_GO succeeded without NBD_INFO_EXPORT")
    return n


async def _export_name(wire: Wire, address: NbdAddress, no_zeroes: bool, n: Negotiated) -> None:
    """Old servers without ``NBD_OPT_GO``: enter transmission with ``NBD_OPT_EXPORT_NAME``."""
    assert wire.transport is not None
    wire.transport.write(p.encode_option(p.OPT_EXPORT_NAME, address.export.encode()))
    data = await wire.read_exact(10)
    n.size = int(p.U64.unpack_from(data)[0])
    n.flags = int.from_bytes(data[8:10], "big")
    if not no_zeroes:
        await wire.read_exact(124)


async def _starttls(wire: Wire, address: NbdAddress, tls_context: ssl.SSLContext | None) -> None:
    header, payload = (await _option(wire, p.OPT_STARTTLS, p.encode_option(p.OPT_STARTTLS)))[-1]
    if header.reply_type != p.REP_ACK:
        raise NbdNegotiationError(f"server refused TLS: {p.option_error_text(header, payload)}")
    if wire.available:
        raise NbdProtocolError("data received before the TLS handshake")
    context = tls_context or ssl.create_default_context()
    assert wire.transport is not None
    loop = asyncio.get_running_loop()
    try:
        tls_transport = await loop.start_tls(
            wire.transport, wire, context,
            server_hostname=address.host if context.check_hostname else None,
        )
    except ssl.SSLError as exc:
        raise NbdNegotiationError(f"TLS handshake failed: {exc}") from exc
    assert tls_transport is not None
    wire.transport = tls_transport
