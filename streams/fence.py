"""Change-ID fences: when an operator's fence makes a committed change ID untrusted (pure).

A fence (``schemas.events.ChangeIdFence``, published by ``cbtstream fence``) says: change IDs
issued before ``before`` within a scope cannot be trusted, e.g. every change ID produced by
ESXi hosts before the patch for a CBT bug (VMware KB 317933). The rule, for a disk whose latest
commit came from a snapshot taken at ``issued`` and a new snapshot ``snap``:

* the fence is not revoked, and ``issued < fence.before``: the committed change ID is older
  than the fence's time (a full sync after the fence commits a newer one, so a fence is
  self-limiting: it costs each disk in scope one full sync);
* and the scope covers the disk: ``all``; ``vm`` naming the disk's VM by instance uuid,
  inventory path or name; ``host`` naming the ESXi host the VM ran on when ``snap`` was taken
  (``SnapshotTaken.esxi_host``); ``vcenter`` naming ``snap.vcenter`` (``host[:port]``, a URL
  is reduced to that).

Then the next sync is full with reason ``fenced``. Only the host of the *new* snapshot is known
to the planner: a VM that left a fenced host between the two snapshots is covered by a VM or
vCenter fence, not a host fence.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from urllib.parse import urlsplit

from schemas.events import ChangeIdFence, FenceScope, SnapshotTaken


def vcenter_name(text: str) -> str:
    """``https://vc.example:443/sdk`` -> ``vc.example``; ``vc:8443`` stays; lowercase."""
    t = text.strip().lower()
    if "//" in t:
        parts = urlsplit(t)
        host, port = parts.hostname or "", parts.port
        return host if port in (None, 443) else f"{host}:{port}"
    return t[:-4] if t.endswith(":443") else t


def covers(fence: ChangeIdFence, snap: SnapshotTaken) -> bool:
    """Whether ``fence``'s scope includes the disk of ``snap``."""
    target = (fence.target or "").strip()
    if fence.scope == FenceScope.ALL:
        return True
    if fence.scope == FenceScope.VM:
        d = snap.disk
        return target.lower() == d.vm_instance_uuid.lower() or target in (d.vm_path, d.vm_name)
    if fence.scope == FenceScope.HOST:
        return snap.esxi_host is not None and target.lower() == snap.esxi_host.lower()
    return vcenter_name(target) == vcenter_name(snap.vcenter)


def fence_for(fences: Iterable[ChangeIdFence], issued: datetime | None,
              snap: SnapshotTaken) -> ChangeIdFence | None:
    """The fence (the one with the latest ``before``) that makes the change ID committed from
    a snapshot taken at ``issued`` untrusted for ``snap``; None if it is trusted."""
    if issued is None:
        return None
    hits = [f for f in fences if not f.revoked and issued < f.before and covers(f, snap)]
    return max(hits, key=lambda f: f.before, default=None)


def trusted(fences: Iterable[ChangeIdFence], issued: datetime | None,
            snap: SnapshotTaken) -> tuple[bool, str]:
    """``(True, "")`` or ``(False, why)`` naming the fence."""
    f = fence_for(fences, issued, snap)
    if f is None:
        return True, ""
    return False, (f"fence {f.fence_id} ({f.scope} {f.target or ''}, before "
                   f"{f.before.isoformat()}): {f.reason}")
