"""Errors of the VDDK export path, each with the reason that ends up in ``SyncFailed``."""

from __future__ import annotations

from cbtstream.errors import CbtStreamError


class VddkError(CbtStreamError):
    """nbdkit vddk could not serve a snapshot disk."""

    reason = "vddk_error"


class VddkUnavailable(VddkError):
    """nbdkit, the plugin, a filter or the VDDK library is missing, or a parameter is refused:
    an installation or configuration problem, not worth retrying."""

    reason = "vddk_unavailable"


class VddkPasswordError(VddkError):
    """nbdkit could not read the password (``password=+FILE`` unreadable, or the pipe)."""

    reason = "vddk_password"


class VddkThumbprintMismatch(VddkError):
    """The server's certificate does not have the configured or recorded SHA-1 thumbprint."""

    reason = "vddk_thumbprint"


class VddkLoginFailed(VddkError):
    """VDDK could not log in with the configured user and password."""

    reason = "vddk_login"


class VddkStartFailed(VddkError):
    """nbdkit started but did not become ready, or the server could not be reached: may work
    on a later attempt."""

    retriable = True
    reason = "vddk_start"
