"""What the audit stores of one Kafka record: the event it carries, on any topic of
:data:`schemas.topics.AUDITED_TOPICS`. Pure; the live consumer and the audit rebuild
(``cbtctl/replay/audit.py``) both read records with it, so they store the same events.

* disk topics: :func:`schemas.codec.decode` (the record key must name the body's disk, and the
  event type must be one its topic carries);
* ``cbt.deadletter``: the ``DeadLetter`` as it is (keyed by the original record's key);
* ``cbt.changeid.fences``: a ``ChangeIdFence``. A tombstone (null value) is not an event: it has
  no id, no time and no author, so there is nothing to store and :func:`audited_event` returns
  None (it is not dead-lettered either: a compacted topic may carry tombstones);
* ``cbt.schedule.events``: a ``ScheduleEvent``;
* ``cbt.vm.described``: a ``VmDescribed`` (a VM's description at one of its snapshots);
* ``cbt.vm.holds``: a ``ReplicationHold`` (a VM failed over or released; tombstones skipped).

Control records are read like their own readers read them (the planner's fence book and the
scheduler take the body alone, whatever the key), so the audit holds every fence the planner
applies. A record that is not a valid event raises :class:`~schemas.codec.EventDecodeError`.
"""

from __future__ import annotations

from pydantic import ValidationError

from consumers.audit.projection import AuditedEvent
from schemas.codec import MAX_VALUE_BYTES, EventDecodeError, decode
from schemas.events import (
    ChangeIdFence,
    CutoverCompleted,
    DeadLetter,
    ReplicationHold,
    ScheduleEvent,
    VmDescribed,
)
from schemas.topics import (
    CUTOVERS,
    DEADLETTER,
    FENCES,
    HOLDS,
    SCHEDULE_EVENTS,
    VM_DESCRIBED,
    TopicSpec,
)

#: Topics whose values are validated as one model, body only (topic name -> model).
_BODY_ONLY: dict[str, type[DeadLetter | ChangeIdFence | ScheduleEvent | VmDescribed
                           | ReplicationHold | CutoverCompleted]] = {
    DEADLETTER.name: DeadLetter,
    FENCES.name: ChangeIdFence,
    SCHEDULE_EVENTS.name: ScheduleEvent,
    VM_DESCRIBED.name: VmDescribed,
    HOLDS.name: ReplicationHold,
    CUTOVERS.name: CutoverCompleted,
}


def is_tombstone(spec: TopicSpec, value: bytes | None) -> bool:
    """A null value on a compacted topic (fences, holds, cutovers): skipped, never
    dead-lettered."""
    return spec in (FENCES, HOLDS, CUTOVERS) and value is None


def audited_event(spec: TopicSpec, key: bytes | None, value: bytes | None
                  ) -> AuditedEvent | None:
    """The event a record of ``spec``'s topic carries; None for a tombstone of the fences."""
    if is_tombstone(spec, value):
        return None
    model = _BODY_ONLY.get(spec.name)
    if model is None:
        return decode(value, key=key, expect=spec.value_types)
    if value is None:
        raise EventDecodeError("record has no value (tombstone)")
    # A dead letter may be larger than any event (it keeps an input record whole).
    if model is not DeadLetter and len(value) > MAX_VALUE_BYTES:
        raise EventDecodeError(f"value is {len(value)} bytes, more than {MAX_VALUE_BYTES}")
    try:
        return model.model_validate_json(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "<root>"
        raise EventDecodeError(f"invalid {model.__name__}: {where}: {first['msg'][:200]} "
                               f"({exc.error_count()} error(s))") from None
