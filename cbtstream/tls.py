"""Client-side TLS contexts: certificate and host-name verification on unless explicitly off.

One place decides how a client verifies a server, so the Kafka, vSphere and NBD clients cannot
drift apart: the system trust store, or only the given CA file; ``verify=False`` is the single,
explicit opt-out (a lab with self-signed certificates and no CA file).
"""

from __future__ import annotations

import ssl
from pathlib import Path

from cbtstream.config import CopierSettings


def client_context(cafile: Path | None = None, *, verify: bool = True) -> ssl.SSLContext:
    """A TLS client context trusting ``cafile`` (or the system store), verifying unless told."""
    ctx = ssl.create_default_context(cafile=str(cafile) if cafile else None)
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def nbd_tls_context(copier: CopierSettings) -> ssl.SSLContext | None:
    """The context for NBD sources when ``copier.nbd_tls`` is on (TLS for every export), else
    None (``nbds://`` URIs still use TLS, verified against the system trust store)."""
    if not copier.nbd_tls:
        return None
    return client_context(copier.nbd_cafile, verify=copier.nbd_tls_verify)
