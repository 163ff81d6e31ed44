"""Errors of the vSphere side. pyvmomi faults are translated into these in
:mod:`cbtstream.vsphere.adapter` (the only module importing pyvmomi), so callers never import
pyvmomi to catch a fault. Each class's ``reason`` is the machine-readable code used in events."""

from __future__ import annotations

from cbtstream.errors import CbtStreamError

#: ``faultMessage[].key`` values of the CBT faults (DOMAIN.md).
CANNOT_GET_CHANGES_KEY = "vim.hostd.vmsvc.cbt.cannotGetChanges"
NO_TRACK_KEY = "vim.hostd.vmsvc.cbt.noTrack"


class VSphereError(CbtStreamError):
    """Base of every vSphere-side error."""

    reason = "vsphere_error"


class StaleChangeId(VSphereError):
    """vSphere cannot compute changes since this change ID: it is stale (CBT reset, reverted,
    older epoch) or belongs to another disk. The disk needs a full (allocated-areas) copy."""

    reason = "stale_change_id"


class CbtNotEnabled(VSphereError):
    """Change tracking is off for the VM (or was off when the snapshot was taken)."""

    reason = "cbt_not_enabled"


class VSphereNotFound(VSphereError):
    """A VM, snapshot or other managed object does not exist (any more)."""

    reason = "not_found"


class VSphereInvalidArgument(VSphereError):
    """vSphere rejected an argument: unknown device key, offset outside the disk, malformed
    change ID. A bug on our side or stale identity, never retried."""

    reason = "invalid_argument"


class VSphereTransient(VSphereError):
    """Connection errors, timeouts, a busy host: retry with backoff."""

    retriable = True
    reason = "vsphere_transient"


class VSphereAuthError(VSphereError):
    """Login failed, the session is not allowed to do this, or the server's TLS certificate
    could not be verified."""

    reason = "vsphere_auth"


class ToolsNotRunning(VSphereError):
    """A guest operation (shutdown) needs VMware Tools running in the guest, and they are not:
    stop the VM another way (power off) or start the tools."""

    reason = "tools_not_running"


class GuestShutdownTimeout(VSphereError):
    """The guest was asked to shut down (through VMware Tools) and is still powered on when the
    time allowed is over."""

    reason = "guest_shutdown_timeout"


class InvalidPowerState(VSphereError):
    """The VM's power state does not allow the operation (a guest shutdown of a suspended VM)."""

    reason = "invalid_power_state"
