"""CBT change IDs: ``<epoch>/<sequence>``.

Example: ``52 8a b4 5c 7b ab 8e 51-7a 73 16 d1 76 9a 0d a6/2``.

The epoch identifies one CBT tracking session of a disk; a new epoch means CBT was reset and every
change ID of the old epoch is void. The sequence grows within an epoch. Beyond that the value is
opaque: we compare it, never compute with it. ``"*"`` (all allocated areas) is a query argument of
``QueryChangedDiskAreas``, not a change ID, and is rejected here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Hex digits, spaces and dashes (vSphere's format); bounded so hostile input cannot be huge.
_EPOCH_RE = re.compile(r"^[0-9A-Fa-f][0-9A-Fa-f \-]{0,126}[0-9A-Fa-f]$")
_MAX_LEN = 160


class ChangeIdError(ValueError):
    """A string is not a well-formed change ID."""


@dataclass(frozen=True, order=False)
class ChangeId:
    """A parsed change ID. ``str(ChangeId)`` gives back the exact original text."""

    epoch: str
    sequence: int

    @classmethod
    def parse(cls, text: str) -> ChangeId:
        if not isinstance(text, str):
            raise ChangeIdError("change ID must be a string")
        if len(text) > _MAX_LEN:
            raise ChangeIdError(f"change ID longer than {_MAX_LEN} characters")
        epoch, sep, seq = text.rpartition("/")
        if not sep or not epoch or not seq:
            raise ChangeIdError(f"change ID {text!r} is not of the form '<epoch>/<sequence>'")
        if not _EPOCH_RE.match(epoch):
            raise ChangeIdError(f"change ID epoch {epoch!r} is not hex digits, spaces and dashes")
        if not seq.isascii() or not seq.isdigit():
            raise ChangeIdError(f"change ID sequence {seq!r} is not a non-negative integer")
        return cls(epoch=epoch, sequence=int(seq))

    def same_epoch(self, other: ChangeId) -> bool:
        """Epoch comparison ignores case and separators, which vSphere does not vary anyway."""
        return _norm(self.epoch) == _norm(other.epoch)

    def __str__(self) -> str:
        return f"{self.epoch}/{self.sequence}"


def _norm(epoch: str) -> str:
    return epoch.replace(" ", "").replace("-", "").lower()
