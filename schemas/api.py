"""Request bodies of the change-ID write API (the seed's store call and the per-disk variant).

Both are validated here and published as JSON Schemas in ``schemas/json`` so external copiers
(migratekit forks) can check what they send. Unknown fields are ignored, as the seed's Go
handler ignores them: an old binary that sends more than these fields still works.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from schemas.changeid import ChangeId
from schemas.disk import MAX_TEXT


def _change_id(value: str | None) -> str | None:
    if value:
        ChangeId.parse(value)
    return value or None


class StoreChangeIdRequest(BaseModel):
    """``POST /api/v1/replications/{job_id}/changeid`` (the seed's ``StoreChangeIDRequest``)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    change_id: str = Field(min_length=1, max_length=200,
                           description="The VMware change ID the copy made durable.")
    disk_id: str | None = Field(default=None, max_length=64,
                                description="'disk-<device key>'. Required for multi-disk VMs: "
                                "there is no default disk.")
    previous_change_id: str | None = Field(
        default=None, max_length=200,
        description="The change ID the copy started from (empty for a first, full copy). Must "
        "equal the disk's current committed change ID.")
    vm_path: str | None = Field(default=None, max_length=MAX_TEXT,
                                description="Inventory path of the VM (or ?vm_path= in the URL).")
    replication_type: Literal["full", "incremental"] | None = Field(
        default=None,
        description="'full' declares a full copy (then a new CBT epoch is accepted); default: "
        "incremental when there is a previous change ID.")

    _v_new = field_validator("change_id")(_change_id)
    _v_prev = field_validator("previous_change_id")(_change_id)


class DiskCommitRequest(BaseModel):
    """``POST /api/v1/disks/{vm uuid}/disk-{key}/commits``: the per-disk variant."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    job_id: str = Field(min_length=1, max_length=256, description="The copier's own job id.")
    change_id: str = Field(min_length=1, max_length=200)
    previous_change_id: str | None = Field(default=None, max_length=200)
    replication_type: Literal["full", "incremental"] | None = None
    bytes_copied: int = Field(default=0, ge=0)

    _v_new = field_validator("change_id")(_change_id)
    _v_prev = field_validator("previous_change_id")(_change_id)
