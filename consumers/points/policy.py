"""The retention policy of restore points (the proposed ``[points]`` settings section).

Meant to be wired as ``Settings.points: PointsPolicy`` in ``cbtstream/config.py`` (env:
``CBTSTREAM_POINTS__COUNT=4``, ``CBTSTREAM_POINTS__MAX_AGE=P30D``...). The defaults keep only
the live point, which costs nothing: no undo bytes are read or saved.
"""

from __future__ import annotations

from datetime import timedelta

from pydantic import BaseModel, ConfigDict, Field


class PointsPolicy(BaseModel):
    """Which restore points of each disk to keep (the rules: :mod:`consumers.points.retention`)."""

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    #: The newest points kept, the live replica included (1: no history, no undo cost).
    count: int = Field(default=1, ge=1, le=10_000)
    #: Points committed longer ago are dropped whatever else keeps them (the live point never
    #: is). ISO 8601 (``P30D``) or seconds; None: no age limit.
    max_age: timedelta | None = Field(default=None, gt=timedelta(0))
    #: Also keep the newest point of each of the latest ``daily`` UTC days that have one.
    daily: int = Field(default=0, ge=0, le=10_000)
    #: Also keep the newest point of each of the latest ``weekly`` ISO weeks that have one.
    weekly: int = Field(default=0, ge=0, le=10_000)

    @property
    def keeps_history(self) -> bool:
        """Does any point besides the live one survive? If not, a sync saves no undo bytes."""
        return self.count > 1 or self.daily > 0 or self.weekly > 0
