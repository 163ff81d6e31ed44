"""How cbtstream names and describes the snapshots it creates, and how it recognises them.

The orphan hunter (``producers.orphans``) removes only snapshots that carry **both** marks: a
name starting with :data:`NAME_PREFIX` and a description starting with :data:`DESCRIPTION_MARK`
(or the description earlier versions wrote). An administrator's snapshot that merely happens to
be called ``cbtstream-...`` is therefore never touched.
"""

from __future__ import annotations

from datetime import UTC, datetime

NAME_PREFIX = "cbtstream-"
#: Every description cbtstream writes starts with this.
DESCRIPTION_MARK = "cbtstream:"
#: The replication snapshot of ``cbtstream snapshot`` (removed once every disk is synced).
SNAPSHOT_DESCRIPTION = f"{DESCRIPTION_MARK} replication snapshot, removed once every disk is synced"
#: The snapshot ``cbtstream cbt enable|disable`` takes and removes at once (the stun).
STUN_DESCRIPTION = f"{DESCRIPTION_MARK} CBT switch stun, removed at once"
#: What versions before the orphan hunter wrote (``producers.snapshot``).
_LEGACY_DESCRIPTIONS = frozenset({"taken by cbtstream"})


def snapshot_name(now: datetime | None = None) -> str:
    return f"{NAME_PREFIX}{(now or datetime.now(UTC)).strftime('%Y%m%dT%H%M%SZ')}"


def stun_snapshot_name(now: datetime) -> str:
    return f"{NAME_PREFIX}cbt-stun-{now.strftime('%Y%m%dT%H%M%S.%fZ')}"


def created_by_cbtstream(name: str, description: str) -> bool:
    """Both marks present: the name prefix and a description cbtstream writes."""
    return name.startswith(NAME_PREFIX) and (
        description.startswith(DESCRIPTION_MARK) or description in _LEGACY_DESCRIPTIONS)


def is_replication_snapshot(name: str, description: str) -> bool:
    """A snapshot ``cbtstream snapshot`` or the scheduler took for a sync (not a CBT stun):
    while one is on a VM, its copy is still running (the worker removes it once every disk is
    done with it)."""
    return created_by_cbtstream(name, description) and not name.startswith(
        f"{NAME_PREFIX}cbt-stun-")
