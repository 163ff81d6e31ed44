"""Snapshot events published by upstream systems: one ``SnapshotTaken`` JSON object per line.

Each line is validated against the schema on its own; the record key is derived from the body
(never taken from the input), so an upstream system cannot file one disk's change ID under another
disk's key. Invalid lines are reported with their line number and reason; valid lines are
published regardless, so one bad line never blocks the rest.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from pydantic import ValidationError

from schemas.codec import MAX_VALUE_BYTES
from schemas.events import SnapshotTaken, stable_event_id


@dataclass(frozen=True)
class LineError:
    """Why one input line was rejected."""

    line_no: int
    reason: str

    def __str__(self) -> str:
        return f"line {self.line_no}: {self.reason}"


def _reason(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


def parse_line(line_no: int, line: str) -> SnapshotTaken | LineError | None:
    """One line -> an event, an error, or None for a blank line."""
    text = line.strip()
    if not text:
        return None
    if len(text.encode()) > MAX_VALUE_BYTES:
        return LineError(line_no, f"line longer than {MAX_VALUE_BYTES} bytes")
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        return LineError(line_no, f"not JSON: {exc.msg} at column {exc.colno}")
    except (ValueError, RecursionError) as exc:  # too many digits, too deeply nested
        return LineError(line_no, f"not JSON: {str(exc)[:200]}")
    if not isinstance(raw, dict):
        return LineError(line_no, f"expected a JSON object, got {type(raw).__name__}")
    raw.setdefault("event_type", "SnapshotTaken")
    if raw["event_type"] != "SnapshotTaken":
        return LineError(line_no, f"event_type must be SnapshotTaken, not {raw['event_type']!r}")
    try:
        event = SnapshotTaken.model_validate(raw)
    except ValidationError as exc:
        return LineError(line_no, f"invalid SnapshotTaken: {_reason(exc)}")
    if "event_id" not in raw:
        # Re-publishing the same line must be recognisable as the same fact: derive the id
        # from what identifies a disk snapshot, as the vSphere producer does.
        event = event.model_copy(update={"event_id": snapshot_event_id(event)})
    return event


def snapshot_event_id(event: SnapshotTaken) -> uuid.UUID:
    """The deterministic id of a disk snapshot event (shared with the vSphere producer)."""
    return stable_event_id(
        "SnapshotTaken", event.vcenter, event.disk.vm_instance_uuid, event.vm_snapshot,
        event.disk.device_key,
    )


def parse_lines(lines: Iterable[str]) -> Iterator[SnapshotTaken | LineError]:
    for no, line in enumerate(lines, 1):
        result = parse_line(no, line)
        if result is not None:
            yield result
