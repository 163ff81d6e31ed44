"""Disk identity. A disk is named completely by :class:`DiskRef` and keyed by
``<vm instance uuid>/disk-<device key>``.

The key uses the VM's ``config.instanceUuid`` (stable across renames and moves), never the
inventory path, and the device key (unique only within the VM; 2000... on ESXi, 204... in the
simulator; never assumed). The key is readable in console tools: no spaces, ``:``, ``,`` or ``=``.
"""

from __future__ import annotations

import re
import uuid

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_DISK_ID_RE = re.compile(r"^disk-(\d{1,9})$")
_KEY_RE = re.compile(
    r"^(?P<vm>[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})/disk-(?P<key>\d{1,9})$"
)
#: Upper bound on strings we accept from events: generous for real inventory paths, small enough
#: that a hostile event cannot make us store megabytes.
MAX_TEXT = 1024


def disk_id_for(device_key: int) -> str:
    """The seed-compatible disk id, ``disk-<device key>``."""
    return f"disk-{device_key}"


def disk_key_for(vm_instance_uuid: str, device_key: int) -> str:
    """The Kafka record key and table key of one disk."""
    return f"{str(uuid.UUID(vm_instance_uuid)).lower()}/{disk_id_for(device_key)}"


def parse_disk_key(key: str) -> tuple[str, int]:
    """Split a disk key into (vm instance uuid, device key); raises ``ValueError`` if malformed."""
    m = _KEY_RE.match(key)
    if m is None:
        raise ValueError(f"not a disk key (<vm instance uuid>/disk-<device key>): {key[:100]!r}")
    return m["vm"], int(m["key"])


def datastore_of(backing_file: str) -> str | None:
    """The datastore of a backing file named ``[datastore1] vm/vm.vmdk``; None otherwise."""
    if backing_file.startswith("[") and "]" in backing_file:
        name = backing_file[1 : backing_file.index("]")].strip()
        return name or None
    return None


class DiskRef(BaseModel):
    """Everything that identifies one virtual disk at one point in time."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    vm_instance_uuid: str = Field(description="The VM's config.instanceUuid (lower case).")
    vm_path: str = Field(
        max_length=MAX_TEXT, description="Inventory path, e.g. /DC/vm/pgtest1 (informational)."
    )
    vm_name: str = Field(max_length=MAX_TEXT)
    device_key: int = Field(ge=0, le=999_999_999, description="VirtualDisk.key within the VM.")
    disk_id: str = Field(description="'disk-<device_key>', as in the seed's API.")
    backing_uuid: str = Field(default="", max_length=128, description="Backing file's disk UUID.")
    backing_file: str = Field(max_length=MAX_TEXT, description="e.g. '[datastore1] vm/vm.vmdk'.")
    capacity_bytes: int = Field(ge=0, le=1 << 50, description="capacityInBytes of the disk.")

    @field_validator("vm_instance_uuid")
    @classmethod
    def _uuid(cls, value: str) -> str:
        try:
            return str(uuid.UUID(value)).lower()
        except ValueError as exc:
            raise ValueError("vm_instance_uuid must be a UUID") from exc

    @model_validator(mode="before")
    @classmethod
    def _default_disk_id(cls, data: object) -> object:
        if isinstance(data, dict) and "disk_id" not in data and "device_key" in data:
            data = {**data, "disk_id": f"disk-{data['device_key']}"}
        return data

    @model_validator(mode="after")
    def _disk_id_matches_key(self) -> DiskRef:
        if self.disk_id != disk_id_for(self.device_key):
            raise ValueError(
                f"disk_id {self.disk_id!r} does not match device_key {self.device_key}"
            )
        return self

    @property
    def key(self) -> str:
        """``<vm instance uuid>/disk-<device key>``: the record key of every event of this disk."""
        return disk_key_for(self.vm_instance_uuid, self.device_key)
