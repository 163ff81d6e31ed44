"""The fence book: every change-ID fence, read from the compacted ``cbt.changeid.fences``
(a :class:`streams.book.ControlBook`). The planner does not plan before the book has read up to
the end offsets it found at start: a fence published before a snapshot is never missed because
the worker had just started."""

from __future__ import annotations

import logging

from cbtstream.config import KafkaSettings
from schemas.events import ChangeIdFence
from schemas.topics import FENCES
from streams.book import ControlBook, read_book

log = logging.getLogger("cbtstream.fences")


class FenceBook(ControlBook[ChangeIdFence]):
    """``await book.run()`` in the background; ``book.active()`` for the planner."""

    def __init__(self, settings: KafkaSettings) -> None:
        super().__init__(settings, FENCES, ChangeIdFence, log, "fence")

    @property
    def fences(self) -> dict[str, ChangeIdFence]:
        return self.records

    def active(self) -> tuple[ChangeIdFence, ...]:
        return tuple(f for f in self.records.values() if not f.revoked)


async def read_fences(settings: KafkaSettings) -> list[ChangeIdFence]:
    """Every fence (revoked ones too) as of now: for ``cbtstream status`` and ``fence --list``."""
    return await read_book(FenceBook(settings))
