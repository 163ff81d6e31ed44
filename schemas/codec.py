"""Wire format: single-line UTF-8 JSON values, the disk key as record key, and the event type and
schema version repeated in record headers so kcat users can filter without parsing JSON.

``encode`` and ``decode`` are the only functions that turn events into bytes and back. ``decode``
checks that the record key names the same disk as the body: a record keyed by one disk and carrying
another disk's change ID is exactly the bug this project exists to prevent.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

from pydantic import BaseModel, ValidationError

from schemas.events import DISK_EVENT_ADAPTER, EVENT_TYPES, SCHEMA_VERSION, DeadLetter, DiskEvent

CONTENT_TYPE = b"application/json"
#: Values larger than this are refused before parsing (Kafka's default max message is ~1 MiB).
MAX_VALUE_BYTES = 1024 * 1024
#: Largest dead-letter value published. JSON escaping can grow a text value up to 6x, so an
#: original value too large for this is left out of its letter (the letter names its size and
#: sha256; the record stays readable at its origin until retention) rather than failing the send.
MAX_DEAD_LETTER_BYTES = 6 * 1024 * 1024
#: ``max_request_size`` of our producers: room for a dead letter plus headers and batch overhead.
#: The dead-letter topic is created with ``max.message.bytes`` above it (``schemas.topics``).
MAX_REQUEST_BYTES = MAX_DEAD_LETTER_BYTES + 256 * 1024

Headers = list[tuple[str, bytes]]


class EventDecodeError(ValueError):
    """A record is not a valid event; ``str()`` says why in one line."""


def encode_value(event: BaseModel) -> bytes:
    return event.model_dump_json().encode()


def headers_for(event: BaseModel) -> Headers:
    return [
        ("event-type", str(getattr(event, "event_type", type(event).__name__)).encode()),
        ("schema-version", str(SCHEMA_VERSION).encode()),
        ("content-type", CONTENT_TYPE),
    ]


def encode(event: BaseModel) -> tuple[bytes | None, bytes, Headers]:
    """(key, value, headers) of an event. Dead letters keep the original key."""
    if isinstance(event, DeadLetter):
        key = None
        if event.original_key is not None:
            key = (
                event.original_key.encode()
                if event.original_key_encoding == "utf-8"
                else base64.b64decode(event.original_key)
            )
        return key, encode_value(event), headers_for(event)
    return str(getattr(event, "key")).encode(), encode_value(event), headers_for(event)  # noqa: B009


def _short(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        parts.append(f"{loc}: {err['msg']}")
    more = exc.error_count() - len(parts)
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


class _Unchecked:
    """Type of the default of ``decode(key=...)``: no record key to check."""


_UNCHECKED = _Unchecked()


#: Event types that are not about one disk (decoded elsewhere: dead letters, fences, the
#: scheduler's events, the VM descriptions).
_NOT_DISK_EVENTS = ("DeadLetter", "ChangeIdFence", "ScheduleEvent", "VmDescribed",
                    "ReplicationHold", "CutoverCompleted")


def decode(
    value: bytes | str | None,
    key: bytes | str | _Unchecked | None = _UNCHECKED,
    expect: tuple[type[BaseModel], ...] | None = None,
) -> DiskEvent:
    """Parse and validate one disk event. If ``key`` is given (a record's key) it must equal the
    body's disk key; a record without a key (``key=None``) is refused too: the producer put it in
    any partition, maybe not the one holding its disk's row. If ``expect`` is given the event must
    be one of those types."""
    if value is None:
        raise EventDecodeError("record has no value (tombstone)")
    if len(value) > MAX_VALUE_BYTES:
        raise EventDecodeError(f"value is {len(value)} bytes, more than {MAX_VALUE_BYTES}")
    try:
        raw: Any = json.loads(value)
    except (ValueError, RecursionError) as exc:
        # ValueError: JSONDecodeError, UnicodeDecodeError and Python's limit on integer digits;
        # RecursionError: nesting deeper than the parser's stack. All mean "not an event".
        raise EventDecodeError(f"value is not JSON: {str(exc)[:300]}") from None
    if not isinstance(raw, dict):
        raise EventDecodeError(f"value is JSON {type(raw).__name__}, not an object")
    etype = raw.get("event_type")
    if not isinstance(etype, str) or etype not in EVENT_TYPES or etype in _NOT_DISK_EVENTS:
        raise EventDecodeError(f"unknown event_type {str(etype)[:64]!r}")
    try:
        event = DISK_EVENT_ADAPTER.validate_python(raw)
    except ValidationError as exc:
        raise EventDecodeError(f"invalid {etype}: {_short(exc)}") from None
    if expect is not None and not isinstance(event, expect):
        names = ", ".join(t.__name__ for t in expect)
        raise EventDecodeError(f"{etype} is not expected here (expected {names})")
    if key is None:
        raise EventDecodeError(f"record has no key (expected the disk key {event.disk.key!r})")
    if not isinstance(key, _Unchecked):
        key_text = key.decode(errors="replace") if isinstance(key, bytes) else key
        if key_text != event.disk.key:
            raise EventDecodeError(
                f"record key {key_text[:120]!r} does not name the body's disk {event.disk.key!r}"
            )
    return event


def text_or_base64(data: bytes | None) -> tuple[str | None, str]:
    """Represent raw bytes in JSON losslessly: UTF-8 text when possible, else base64."""
    if data is None:
        return None, "utf-8"
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return base64.b64encode(data).decode(), "base64"


def dead_letter_record(
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    value: bytes | None,
    error: str,
    stage: str,
) -> tuple[bytes | None, bytes, Headers]:
    """The dead-letter record for an input record that could not be used: the original key and
    value kept losslessly, and headers naming its origin and the error (for kcat users)."""
    k_text, k_enc = text_or_base64(key)
    v_text, v_enc = text_or_base64(value)
    letter = DeadLetter(
        original_topic=topic,
        original_partition=partition,
        original_offset=offset,
        original_key=k_text,
        original_key_encoding=k_enc,  # type: ignore[arg-type]
        original_value=v_text,
        original_value_encoding=v_enc,  # type: ignore[arg-type]
        error=error[:8192],
        stage=stage,
    )
    out_key, out_value, headers = encode(letter)
    if len(out_value) > MAX_DEAD_LETTER_BYTES:
        assert value is not None
        omitted = f"{len(value)} bytes sha256:{hashlib.sha256(value).hexdigest()}"
        error = f"{error[:7000]}; original value ({omitted}) too large to keep: read it at origin"
        letter = letter.model_copy(update={"original_value": None, "error": error})
        out_key, out_value, headers = encode(letter)
        headers.append(("original-value-omitted", omitted.encode()))
    headers += [
        ("original-topic", topic.encode()),
        ("original-partition", str(partition).encode()),
        ("original-offset", str(offset).encode()),
        ("error", error[:1000].encode(errors="replace")),
    ]
    return out_key, out_value, headers
