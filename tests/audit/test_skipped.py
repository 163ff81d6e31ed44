"""The audit records ``DiskSkipped`` (issue 12 item 4) in its events table, from the broker."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from cbtstream.config import Settings
from consumers.audit.repository import AuditRepository
from schemas.events import DiskSkipped, SkipReason
from tests.audit.conftest import publish, running_audit, wait_for
from tests.unit.factories import disk

pytestmark = pytest.mark.integration


async def test_disk_skipped_is_stored_as_an_event(audit_settings: Settings,
                                                  repo: AuditRepository) -> None:
    ev = DiskSkipped(disk=disk(2003), vcenter="vc", vm_snapshot="snapshot-7",
                     reason=SkipReason.INDEPENDENT_NONPERSISTENT, taken_at=datetime.now(UTC))
    await publish(audit_settings, [ev])

    async def stored() -> bool:
        return bool(await repo.fetch("SELECT 1 FROM events WHERE event_id = $1", ev.event_id))

    async with running_audit(audit_settings):
        await wait_for(stored, what="the DiskSkipped event stored")
    [row] = await repo.fetch("SELECT event_type, disk_key, vm_snapshot, body FROM events "
                             "WHERE event_id = $1", ev.event_id)
    assert (row["event_type"], row["disk_key"], row["vm_snapshot"]) == (
        "DiskSkipped", ev.disk.key, "snapshot-7")
    assert DiskSkipped.model_validate_json(row["body"]) == ev
