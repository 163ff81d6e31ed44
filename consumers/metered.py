"""The copier's publisher that counts what it published (outcomes and dead letters) in its
:class:`~cbtstream.metrics.Metrics`, after the broker acknowledged each record."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from cbtstream.config import KafkaSettings
from cbtstream.kafka import Publisher, topic_name
from cbtstream.metrics import Metrics
from schemas.codec import Headers
from schemas.topics import DEADLETTER


class MeteredPublisher(Publisher):
    """A :class:`Publisher` that records what it published: outcomes and dead letters."""

    def __init__(self, settings: KafkaSettings, metrics: Metrics, component: str,
                 **kwargs: Any) -> None:
        super().__init__(settings, **kwargs)
        self.metrics = metrics
        self._component = component
        self._deadletter = topic_name(DEADLETTER, settings)

    async def publish(self, event: BaseModel) -> tuple[int, int]:
        where = await super().publish(event)
        self.metrics.observe_outcome(event)
        return where

    async def publish_raw(self, topic: str, key: bytes | None, value: bytes,
                          headers: Headers) -> tuple[int, int]:
        where = await super().publish_raw(topic, key, value, headers)
        if topic == self._deadletter:
            self.metrics.observe_dead_letter(self._component)
        return where
