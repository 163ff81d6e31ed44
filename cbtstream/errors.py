"""The exception hierarchy: one root, retryability as a class attribute.

Third-party errors (pyvmomi faults, aiokafka errors, OSError from NBD sockets) are translated into
these at the adapter boundary with ``raise ... from exc`` so callers never import a third-party
library just to catch its errors.
"""

from __future__ import annotations


class CbtStreamError(Exception):
    """Root of every error cbtstream raises on purpose."""

    #: True when the same operation may succeed if tried again later (network blips, a broker
    #: leader election, a busy vCenter). Callers retry those with backoff; the rest are final.
    retriable: bool = False
    #: Short machine-readable reason used in ``SyncFailed.reason`` and in metrics labels.
    reason: str = "error"


class ConfigError(CbtStreamError):
    """The configuration is invalid or incomplete."""

    reason = "config_error"


class StackError(CbtStreamError):
    """A service of the local development stack could not be installed, started or reached."""

    reason = "stack_error"


class TransientError(CbtStreamError):
    """A failure that is expected to go away on its own (timeouts, connection resets)."""

    retriable = True
    reason = "transient"


class PermissionDenied(CbtStreamError):
    """An event asked for a source or target outside what the configuration allows."""

    reason = "not_allowed"
