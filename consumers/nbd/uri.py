"""NBD URIs (the subset of the NBD URI standard that nbdcopy and nbdinfo also accept) and the
endpoint allow-list check.

``nbd://host[:port][/export]``, ``nbds://...`` (TLS), ``nbd+unix:///export?socket=/path`` and
``nbds+unix:///export?socket=/path``. An allow-list entry is ``host`` (any port), ``host:port``,
``unix:/absolute/socket/path`` or ``unix:/absolute/folder/`` (ending in ``/``: any socket below
that folder, e.g. the private sockets of the VDDK exports); IPv6 hosts are written in brackets
(``[::1]:10809``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

from cbtstream.errors import ConfigError, PermissionDenied

DEFAULT_PORT = 10809


@dataclass(frozen=True, slots=True)
class NbdAddress:
    """Where an export is and how to reach it."""

    export: str = ""
    host: str | None = None
    port: int = DEFAULT_PORT
    socket_path: str | None = None
    tls: bool = False

    def endpoint(self) -> str:
        """``host:port`` or ``unix:/path``: the form the allow-list uses."""
        if self.socket_path is not None:
            return f"unix:{self.socket_path}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_nbd_uri(uri: str) -> NbdAddress:
    """Parse an NBD URI; raises :class:`ConfigError` for anything we do not understand."""
    try:
        parts = urlsplit(uri)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"invalid NBD URI {uri[:200]!r}: {exc}") from exc
    scheme = parts.scheme.lower()
    if scheme not in ("nbd", "nbds", "nbd+unix", "nbds+unix"):
        raise ConfigError(f"not an NBD URI (scheme {scheme!r}): {uri[:200]!r}")
    tls = scheme.startswith("nbds")
    export = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
    query = parse_qs(parts.query)
    if scheme.endswith("+unix"):
        sockets = query.get("socket", [])
        if len(sockets) != 1 or not sockets[0]:
            raise ConfigError(f"NBD unix URI needs exactly one socket= parameter: {uri[:200]!r}")
        path = os.path.normpath(sockets[0])
        if not os.path.isabs(path):
            raise ConfigError(f"NBD socket path must be absolute: {path!r}")
        return NbdAddress(export=export, socket_path=path, tls=tls)
    if not parts.hostname:
        raise ConfigError(f"NBD URI without a host: {uri[:200]!r}")
    return NbdAddress(export=export, host=parts.hostname, port=port or DEFAULT_PORT, tls=tls)


def _split_entry(entry: str) -> tuple[str, int | None]:
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        return host.lower(), int(rest[1:]) if rest.startswith(":") else None
    if entry.count(":") == 1:
        host, port = entry.split(":")
        return host.lower(), int(port)
    return entry.lower(), None


def check_allowed(address: NbdAddress, allow: Sequence[str]) -> None:
    """Raise :class:`PermissionDenied` unless the endpoint matches an allow-list entry."""
    for entry in allow:
        entry = entry.strip()
        if entry.startswith("unix:"):
            if address.socket_path is None:
                continue
            if entry.endswith("/"):
                # Both sides normalised, so "/dir/../elsewhere" cannot pass as "below /dir".
                folder = os.path.normpath(entry[5:])
                if os.path.isabs(folder) and address.socket_path.startswith(folder + os.sep):
                    return
            elif os.path.normpath(entry[5:]) == address.socket_path:
                return
            continue
        if address.host is None:
            continue
        try:
            host, port = _split_entry(entry)
        except ValueError:
            continue
        if host == address.host.lower() and (port is None or port == address.port):
            return
    raise PermissionDenied(f"NBD endpoint {address.endpoint()} is not in copier.nbd_allow")
