"""Errors of the NBD client, rooted in :class:`cbtstream.errors.CbtStreamError`."""

from __future__ import annotations

import errno as _errno

from cbtstream.errors import CbtStreamError


class NbdError(CbtStreamError):
    """Any failure talking to an NBD server."""

    reason = "nbd_error"


class NbdConnectionError(NbdError):
    """The connection could not be made or was lost (the server died, a reset, a timeout)."""

    retriable = True
    reason = "nbd_connection"


class NbdProtocolError(NbdError):
    """The server broke the protocol (bad magic, unknown handle, inconsistent lengths).

    The connection is dropped (a hard disconnect, as the protocol allows) and every request in
    flight fails with this error.
    """

    reason = "nbd_protocol"


class NbdNegotiationError(NbdError):
    """The handshake failed: unknown export, an option refused, TLS required or refused."""

    reason = "nbd_negotiation"


class NbdUnsupported(NbdError):
    """The server does not offer what the caller asked for (writes on a read-only export...)."""

    reason = "nbd_unsupported"


class NbdServerError(NbdError):
    """The server answered a request with an error (``errno`` as sent on the wire)."""

    reason = "nbd_server_error"

    def __init__(
        self, command: str, offset: int, length: int, errno: int, message: str = ""
    ) -> None:
        self.command = command
        self.offset = offset
        self.length = length
        self.errno = errno
        name = _errno.errorcode.get(errno, f"errno {errno}")
        detail = f": {message}" if message else ""
        super().__init__(
            f"NBD {command} at offset {offset} length {length} failed with {name}{detail}"
        )
