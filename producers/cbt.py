"""Turn Changed Block Tracking on or off for a VM, so that it is in effect when this returns.

``ReconfigVM_Task(changeTrackingEnabled=...)`` only records the wish: ESXi applies it at the VM's
next *stun* (snapshot create or remove, power on, resume, vMotion). VMware's procedure (KB
1031873) is therefore "reconfigure, then create and remove a snapshot"; :func:`set_cbt` does
exactly that, with a snapshot named and described as cbtstream's (so the orphan hunter may
remove it if we crash in between), and reports the state read back afterwards.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from cbtstream.vsphere.adapter import CbtStatus, VmRef, VSphereClient
from producers.naming import STUN_DESCRIPTION, stun_snapshot_name

log = logging.getLogger(__name__)


async def set_cbt(client: VSphereClient, vm: VmRef, enabled: bool) -> CbtStatus:
    """Reconfigure ``vm`` with ``changeTrackingEnabled=enabled`` unless its config already says
    so, then stun it with a snapshot create + remove unless the state is already in effect.
    Idempotent: a VM already in the wanted, active state is left alone."""
    status = await client.cbt_status(vm)
    if status.enabled == enabled and status.active == enabled:
        return status
    if status.enabled != enabled:
        if enabled:
            await client.enable_cbt(vm)
        else:
            await client.disable_cbt(vm)
    snap = await client.create_snapshot(vm, stun_snapshot_name(datetime.now(UTC)),
                                        description=STUN_DESCRIPTION)
    await client.remove_snapshot(vm, snap.moref)
    after = await client.cbt_status(vm)
    log.info("CBT switched", extra={"vm": vm.instance_uuid, "enabled": after.enabled,
                                    "active": after.active})
    return after
