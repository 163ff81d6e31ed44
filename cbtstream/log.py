"""Structured logging: one JSON object per line, with the disk key on every line it applies to.

``bind_disk(key)`` sets the disk key for the current asyncio task (a context variable), so every
log line emitted while a disk is being planned, copied or committed carries ``disk_key`` without
each call site passing it. Values that are ``SecretStr`` stay masked; nothing here formats
settings objects.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

_disk_key: contextvars.ContextVar[str | None] = contextvars.ContextVar("disk_key", default=None)

#: Attributes every LogRecord has; anything else on a record came from ``extra=`` and is logged.
_STANDARD_ATTRS = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__.keys() | {"message", "asctime"}
)


@contextlib.contextmanager
def bind_disk(disk_key: str) -> Iterator[None]:
    """Attach ``disk_key`` to every log line emitted inside the block (per asyncio task)."""
    token = _disk_key.set(disk_key)
    try:
        yield
    finally:
        _disk_key.reset(token)


class JsonFormatter(logging.Formatter):
    """Formats a record as a single line of JSON that ``jq`` can read."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        disk_key = _disk_key.get()
        if disk_key is not None:
            doc["disk_key"] = disk_key
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                doc[key] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str, separators=(",", ":"))


class ConsoleFormatter(logging.Formatter):
    """Human-readable lines for interactive use; still shows the disk key and extras."""

    def format(self, record: logging.LogRecord) -> str:
        extras = {
            k: v
            for k, v in record.__dict__.items()
            if k not in _STANDARD_ATTRS and not k.startswith("_")
        }
        disk_key = _disk_key.get()
        prefix = f"[{disk_key}] " if disk_key else ""
        tail = " ".join(f"{k}={v}" for k, v in extras.items())
        line = f"{record.levelname:<7} {record.name}: {prefix}{record.getMessage()}"
        if tail:
            line = f"{line} {tail}"
        if record.exc_info:
            line = f"{line}\n{self.formatException(record.exc_info)}"
        return line


def configure_logging(level: str = "INFO", fmt: str = "json",
                      library_level: str = "WARNING") -> None:
    """Send all logs to stderr in the chosen format (idempotent). Third-party libraries
    (Kafka clients, Faust) log at ``library_level`` or ``level``, whichever is higher."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else ConsoleFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Third-party libraries are chatty at INFO; keep them at WARNING unless debugging.
    for noisy in ("aiokafka", "kafka", "faust", "mode", "asyncio"):
        logging.getLogger(noisy).setLevel(
            max(logging.getLevelName(library_level), logging.getLevelName(level)))
